"One config from the command line to the checkpoint: every field reaches every notebook, bad overrides stop a run first."
import json, re
from pathlib import Path
import nbformat, pandas as pd, pytest
from conftest import run_cli, ROOT
from emi_nb.config import (make_config, config_fields, CHOICES, POSITIVE, ConfigError, StudyConfig, _get)
from emi_nb.study import study_notebooks

def _other(name:str, tp, default):
    "A valid value of field `name` that differs from `default`."
    if name in CHOICES:
        allowed = CHOICES[name]
        if isinstance(default, tuple): return tuple(allowed[:1]) if default != tuple(allowed[:1]) else tuple(allowed[:2])
        return next(a for a in allowed if a != default)
    if name == 'device': return 'cuda:1'
    if isinstance(default, bool) or tp == (bool | None): return not default if default is not None else True
    if isinstance(default, int): return default + 2
    if isinstance(default, float): return round(default * 2 + 0.25, 6)
    if isinstance(default, str): return f'/override/{name}'
    raise AssertionError(f'no test value for {name}: {tp}')

def all_overrides(profile:str='smoke') -> dict:
    "An override of every config field, each valid and different from the profile's value."
    base = make_config(profile)
    return {k: _other(k, tp, _get(base, k)) for k, (tp, _, _) in config_fields().items() if k != 'profile'}

def test_every_field_can_be_overridden_at_once():
    ov = all_overrides()
    cfg = make_config('smoke', **ov)
    assert all(_get(cfg, k) == v for k, v in ov.items())
    assert len(ov) == len(config_fields()) - 1 and len(ov) > 100

def _cells(nb):
    return [c for c in nbformat.read(nb, 4).cells if c.cell_type == 'code']

@pytest.mark.parametrize('nb', study_notebooks(), ids=lambda p: p.stem)
def test_every_notebook_builds_its_config_from_every_override(nb):
    """Each study notebook has the two parameters `profile` and `overrides`, and every config it builds comes from
    `make_config(profile, **overrides)`: executed with an override of every field, that config holds every value."""
    cells = _cells(nb)
    params = [c.source for c in cells if 'parameters' in c.metadata.get('tags', [])]
    assert len(params) == 1, f'{nb.name}: {len(params)} parameters cells'
    assert re.findall(r'^(\w+)\s*:', params[0], re.M) == ['profile', 'overrides'], params[0]
    calls = [l.strip() for c in cells if not c.source.startswith('#| export')
             for l in c.source.splitlines() if 'make_config(profile' in l]
    assert calls, f'{nb.name} builds no config from its parameters'
    ns = {}
    exec(params[0], ns)
    ov = all_overrides()
    ns.update(profile='smoke', overrides=ov, make_config=make_config)
    for line in calls:
        expr = re.search(r'make_config\(profile[^)]*\)', line).group(0)
        assert expr == 'make_config(profile, **overrides)', f'{nb.name}: {line}'
        cfg = eval(expr, ns)
        assert cfg == make_config('smoke', **ov)

def test_bad_overrides_exit_2_before_any_notebook(tmp_path):
    r = run_cli('emi_study', '--profile', 'smoke', '--run-dir', tmp_path/'a', '-p', 'lr_typo=1', check=False)
    assert r.returncode == 2 and "'lr_typo'" in r.stderr and 'did you mean lr' in r.stderr
    assert not (tmp_path/'a').exists()
    r = run_cli('emi_study', '--profile', 'smoke', '--run-dir', tmp_path/'b', '-p', 'epochs=abc', check=False)
    assert r.returncode == 2 and "epochs='abc'" in r.stderr and 'expected int' in r.stderr
    assert not (tmp_path/'b').exists()
    r = run_cli('emi_study', '--profile', 'smoke', '--run-dir', tmp_path/'c', '-p', 'ablations.head_epoch=3', check=False)
    assert r.returncode == 2 and 'ablations.head_epochs' in r.stderr

def test_override_reaches_training_results(tmp_path):
    "The training notebook trains with overrides from the command line: they are in its results JSON and its steps."
    run_cli('emi_study', '--profile', 'smoke', '--only', '08_train', '--no-site', '--run-dir', tmp_path/'run',
            '-p', 'lr=0.00031', '-p', 'batch_size=4', '-p', 'quarantine=true', '-p', 'compare_untrained=false', timeout=1200)
    res = json.loads((tmp_path/'run/results/emi.json').read_text())
    c = res['config']
    assert (c['lr'], c['batch_size'], c['quarantine']) == (0.00031, 4, True)
    n_train = len(pd.read_csv(Path(res['provenance']['data_root'])/'train_split.csv'))
    assert all(r['steps'] == -(-n_train // 4) for r in res['metrics']['curves']), (n_train, res['metrics']['curves'])
    man = json.loads((tmp_path/'run/manifest.json').read_text())
    assert man['parameters']['overrides']['lr'] == 0.00031
    ckpt = json.loads(next((tmp_path/'run/checkpoints/emi').glob('best-*/config.json')).read_text())
    assert ckpt['config']['lr'] == 0.00031 and ckpt['config']['batch_size'] == 4

def test_emi_train_help_lists_every_field_and_flags_train(tmp_path):
    h = run_cli('emi_train', '--help').stdout
    missing = [k for k in config_fields() if f"--{k.replace('_', '-')}" not in h]
    assert not missing, missing
    assert '--progress' in h and 'log' in h
    r = run_cli('emi_train', '--profile', 'smoke', '--backbone', 'preset:tiny', '--lr', '3e-4', '--batch-size', '4',
                '--epochs', '1', '--max-steps', '2', '--run-dir', tmp_path/'run', '--progress', 'off')
    assert 'training on' in r.stdout and 'batch 4' in r.stdout and 'lr 0.0003' in r.stdout
    res = json.loads((tmp_path/'run/results/emi.json').read_text())
    assert (res['config']['lr'], res['config']['batch_size']) == (3e-4, 4)
    assert 'valid rho' in r.stdout and 'Admi' in r.stdout
    again = run_cli('emi_train', '--profile', 'smoke', '--backbone', 'preset:tiny', '--epochs', '1', '--max-steps', '1',
                    '--run-dir', tmp_path/'run', check=False)
    assert again.returncode == 2 and '--resume' in again.stderr and '--overwrite' in again.stderr
