"""Jobs that finish together share one least-squares reference: computed once, read by all."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from muonreg.data.simulate import write_simulated_dataset

SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from muonreg.data.format import DatasetReader
    from muonreg.evaluation import reference
    real = reference.fit_events
    def counted(*args):
        with open(sys.argv[2], "a") as f:
            f.write("computed\\n")
        return real(*args)
    reference.fit_events = counted
    reader = DatasetReader(sys.argv[1])
    rows = reference.fit_reference(reader, np.arange(40), sys.argv[3])
    np.save(sys.argv[4], rows["pred_pt"])
    """
)


@pytest.mark.slow
def test_two_jobs_computing_the_same_reference_compute_it_once(tmp_path):
    data = write_simulated_dataset(tmp_path / "ds", 40, seed=2, progress=False)
    counter, cache = tmp_path / "count.txt", tmp_path / "cache"
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(data), str(counter), str(cache), str(tmp_path / f"{i}.npy")]
        )
        for i in range(2)
    ]
    assert [job.wait(timeout=300) for job in jobs] == [0, 0]
    assert counter.read_text().count("computed") == 1
    np.testing.assert_array_equal(np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy"))
    assert not list((cache / "fits").glob("*.tmp*"))
