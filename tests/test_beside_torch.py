"""npconvnext in a process where torch and timm were imported and ran first (every parity test,
every notebook that also has timm): it must leave what it does not own as it found it.

torch brings its own OpenMP runtime, which Numba's OpenMP layer then shares, and its own thread
settings; NumPy's BLAS has a process-wide thread count. The script runs in a fresh process so
that torch really loads first.
"""

import json
import os
import subprocess
import sys

from tests.support import STARTING_ENVIRON

_SCRIPT = """
import json, os, sys, threading, warnings
import torch, timm
from threadpoolctl import threadpool_info

warnings.simplefilter("ignore")
torch.manual_seed(0)
reference = timm.create_model("convnext_atto", pretrained=False).eval()
with torch.no_grad():
    for p in reference.parameters():
        p.add_(torch.randn_like(p) * 0.02)  # off its init, so layer scale and biases matter
x = torch.randn(3, 3, 64, 64)
with torch.no_grad():
    expected = reference(x).numpy()


def settings():
    return dict(environ=dict(os.environ), torch_threads=torch.get_num_threads(),
                torch_interop=torch.get_num_interop_threads(),
                pools=sorted((i["internal_api"], i["filepath"], i["num_threads"]) for i in threadpool_info()))


before = settings()
import numpy as np
import npconvnext
from npconvnext.engine import block

from threadpoolctl import ThreadpoolController

model = npconvnext.create_model("convnext_atto", weights={k: v.numpy() for k, v in reference.state_dict().items()})
blas = ThreadpoolController().select(user_api="blas").lib_controllers
seen, running = set(), True


def watch():  # what another thread's matmul would get while the model runs
    while running:
        seen.add(tuple(library.get_num_threads() for library in blas))


watcher = threading.Thread(target=watch)
watcher.start()
for _ in range(3):
    for batch in (1, 3):  # one image; and a batch, the case that may share images between threads
        got = model(x.numpy()[:batch])
        error = float(np.abs(got - expected[:batch]).max() / np.abs(expected).max())
        assert error < 1e-4, (batch, error)
running = False
watcher.join()
after = settings()
with torch.no_grad():
    again = reference(x).numpy()
print(json.dumps(dict(before=before, after=after, torch_again=bool((again == expected).all()),
                      blas_seen_meanwhile=sorted(seen), blas_before=[library.get_num_threads() for library in blas],
                      threading_layer=__import__("numba").threading_layer())))
"""


def run(env_changes: dict[str, str | None]) -> dict:
    env = dict(STARTING_ENVIRON)  # not what in-process tests' libraries added since
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def check_left_alone(got: dict) -> None:
    before, after = got["before"], got["after"]
    changed_env = {k: (before["environ"].get(k), after["environ"].get(k))
                   for k in before["environ"].keys() | after["environ"].keys()
                   if before["environ"].get(k) != after["environ"].get(k)}
    assert not changed_env, f"npconvnext changed the environment: {changed_env}"
    assert (after["torch_threads"], after["torch_interop"]) == (before["torch_threads"], before["torch_interop"])
    # threadpoolctl's view: every thread pool torch and NumPy loaded keeps its count (npconvnext's
    # own OpenMP user, Numba, may add a pool; none may change)
    before_pools = {(api, path): n for api, path, n in before["pools"]}
    after_pools = {(api, path): n for api, path, n in after["pools"]}
    assert {k: after_pools.get(k) for k in before_pools} == before_pools
    assert got["blas_seen_meanwhile"] == [got["blas_before"]], "BLAS's thread count changed while the model ran"
    assert got["torch_again"], "torch's model gave other outputs after npconvnext ran"


def test_after_torch_the_model_is_right_and_leaves_settings_alone():
    # the default: OpenMP's workers spin after each loop, so the kernels run serially
    got = run({"OMP_WAIT_POLICY": None, "NUMBA_THREADING_LAYER": "omp", "NPCONVNEXT_NUM_THREADS": None})
    check_left_alone(got)
    assert got["threading_layer"] == "omp"


def test_after_torch_with_sleeping_openmp_workers_and_parallel_kernels():
    # OMP_WAIT_POLICY=PASSIVE exported: the kernels' parallel loops run in torch's OpenMP runtime
    got = run({"OMP_WAIT_POLICY": "PASSIVE", "NUMBA_THREADING_LAYER": "omp", "NPCONVNEXT_NUM_THREADS": None})
    check_left_alone(got)
    assert got["threading_layer"] == "omp"
