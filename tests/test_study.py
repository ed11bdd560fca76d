"The study runner: overrides land in notebooks, failures name notebook and cell, every notebook runs on smoke."
import json
import nbformat
from conftest import run_cli, ROOT

def _nb(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(cells[0], metadata={'tags': ['parameters']})] + [nbformat.v4.new_code_cell(c) for c in cells[1:]]
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, path)

def test_override_lands_in_executed_notebook(tmp_path):
    run_cli('emi_study', '--profile', 'smoke', '--only', '00', '--no-site', '--run-dir', tmp_path/'run', '-p', 'epochs=7', '-p', 'lr=3e-4')
    nb = nbformat.read(tmp_path/'run/notebooks/00_config.ipynb', as_version=4)
    injected = [c for c in nb.cells if 'injected-parameters' in c.metadata.get('tags', [])]
    assert injected and '"epochs": 7' in injected[0].source and '"lr": 0.0003' in injected[0].source
    man = json.loads((tmp_path/'run/manifest.json').read_text())
    assert man['status'] == 'ok' and man['parameters']['overrides']['epochs'] == 7 and man['profile'] == 'smoke'
    assert man['notebooks'][0]['seconds'] > 0 and man['versions']['torch'] and man['assets']['seconds'] >= 0

def test_deliberate_error_names_notebook_and_cell(tmp_path):
    nbs = tmp_path/'nbs'; nbs.mkdir()
    _nb(nbs/'01_fine.ipynb', "x = 1", "y = x + 1")
    _nb(nbs/'02_broken.ipynb', "x = 1", "y = 2", "raise ValueError('deliberate failure')", "z = 3")
    _nb(nbs/'03_never.ipynb', "x = 1")
    r = run_cli('emi_study', '--profile', 'smoke', '--nbs', nbs, '--no-site', '--run-dir', tmp_path/'run', check=False)
    assert r.returncode != 0
    assert '02_broken.ipynb' in r.stderr and 'cell 2' in r.stderr and 'deliberate failure' in r.stderr
    man = json.loads((tmp_path/'run/manifest.json').read_text())
    assert man['status'] == 'failed' and [n['notebook'] for n in man['notebooks']] == ['01_fine.ipynb', '02_broken.ipynb']
    out = nbformat.read(tmp_path/'run/notebooks/02_broken.ipynb', as_version=4)
    assert any(o.get('ename') == 'ValueError' for c in out.cells if c.cell_type == 'code' for o in c.get('outputs', []))

def test_unknown_profile_is_a_clear_error(tmp_path):
    r = run_cli('emi_study', '--profile', 'nope', '--run-dir', tmp_path/'run', check=False)
    assert r.returncode != 0 and 'nope' in r.stderr

def test_smoke_study_runs_every_notebook(smoke_run):
    man = json.loads((smoke_run/'manifest.json').read_text())
    ran = [n['notebook'] for n in man['notebooks']]
    expected = sorted(p.name for p in (ROOT/'nbs').glob('[0-9][0-9]_*.ipynb')) + ['index.ipynb']
    assert ran == expected and all(n['status'] == 'ok' for n in man['notebooks'])
    for n in man['notebooks']: assert (smoke_run/n['output']).exists() and (smoke_run/n['log']).exists()

def test_parameters_cells_are_typed_and_documented(caplog):
    "Every study notebook has one parameters cell; papermill reads each line's type, default and help without warnings."
    import logging, re
    from papermill.inspection import inspect_notebook
    from emi_nb.study import study_notebooks
    for nb in study_notebooks():
        src = [c.source for c in nbformat.read(nb, 4).cells if 'parameters' in c.metadata.get('tags', [])]
        assert len(src) == 1, f'{nb.name}: {len(src)} parameters cells'
        lines = [l for l in src[0].splitlines() if re.match(r'^\w+\s*:', l)]
        with caplog.at_level(logging.WARNING, logger='papermill'):
            caplog.clear(); params = inspect_notebook(str(nb))
        assert not [r for r in caplog.records if 'Unable to parse' in r.getMessage()], f'{nb.name}: {caplog.text}'
        assert len(params) == len(lines), f'{nb.name}: papermill sees {sorted(params)}'
        assert all(p['inferred_type_name'] != 'None' and p['help'] for p in params.values()), f'{nb.name}: untyped or undocumented'
