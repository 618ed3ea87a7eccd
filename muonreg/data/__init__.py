"""Data: the hepattn ATLAS-muon HDF5 layout, the detector simulator, features and the torch dataset."""
