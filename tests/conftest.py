"Shared fixtures: an offline environment and one smoke run of the whole study, shared by all test workers."
import json, os, subprocess, sys
from pathlib import Path
import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', EMI_PROGRESS='off')

def run_cli(*args, check=True, timeout=900, **kw):
    "Run a console script of the package; returns the CompletedProcess."
    exe = BIN/args[0]
    r = subprocess.run([str(exe), *map(str, args[1:])], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}")
    return r

@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory, worker_id):
    "Run directory of `emi_study --profile smoke` over every notebook, made once per test session."
    base = tmp_path_factory.getbasetemp() if worker_id == 'master' else tmp_path_factory.getbasetemp().parent
    run_dir = base/'smoke-run'
    with FileLock(str(base/'smoke-run.lock')):
        man = run_dir/'manifest.json'
        if not man.exists():
            r = run_cli('emi_study', '--profile', 'smoke', '--run-dir', run_dir, check=False, timeout=1500)
            (base/'smoke-run.out').write_text(r.stdout + '\n' + r.stderr)
        m = json.loads(man.read_text())
        if m['status'] != 'ok': pytest.fail(f"smoke study failed: {m.get('error')}\n" + (base/'smoke-run.out').read_text()[-4000:])
    return run_dir

def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU; skipped without one')

def pytest_collection_modifyitems(config, items):
    "Skip the tests marked cuda when torch sees no CUDA GPU."
    import torch
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (torch sees none)')
    for item in items:
        if 'cuda' in item.keywords: item.add_marker(skip)

@pytest.fixture(scope='module')
def clean(tmp_path_factory):
    "A clean smoke corpus, built once per test module, for tests that break copies of it."
    from emi_nb.synth import build_corpus
    return build_corpus(tmp_path_factory.mktemp('data')/'clean', 'smoke')

def copy_root(clean:Path, tmp_path:Path) -> Path:
    "A copy of the clean corpus to break."
    import shutil
    d = tmp_path/'root'
    shutil.copytree(clean, d)
    return d

def first_fid(root:Path, split:str='train', i:int=0) -> int:
    "File id of data row i of a split CSV."
    import pandas as pd
    return int(pd.read_csv(root/f'{split}_split.csv').Filename[i])
