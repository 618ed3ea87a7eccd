"""Classical reconstruction: what a physicist compares the network against.

It may use the nominal detector (`muonreg.detector`) and parametrisations calibrated once on
simulation (`energy_loss`), never the simulator's truth: no per-event loss, offsets or hit labels
beyond choosing which hits to fit.
"""
