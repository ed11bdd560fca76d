"The codebase's shape: one number per notebook, one module per notebook, imports that only point backwards."
import ast, re
from pathlib import Path
import nbformat
from conftest import ROOT

def _number(stem:str) -> int:
    "A notebook's number; the front page comes after every numbered notebook."
    return 99 if stem == 'index' else int(stem[:2])

def _modules() -> dict:
    "module name -> (number, notebook stem) from every notebook's default_exp."
    res = {}
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for c in nbformat.read(nb, 4).cells:
            m = re.search(r'^#\|\s*default_exp\s+(\w+)', c.source, re.M)
            if m: res[m.group(1)] = (_number(nb.stem), nb.stem)
    return res

def _imports(src:str, package:bool=False) -> set:
    "emi_nb modules imported anywhere in `src` (top level or inside functions)."
    out = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if mod.startswith('emi_nb.'): out.add(mod.split('.')[1])
            elif mod == 'emi_nb': out |= {a.name for a in node.names}
            elif package and node.level == 1 and mod: out.add(mod.split('.')[0])
        elif isinstance(node, ast.Import):
            out |= {a.name.split('.')[1] for a in node.names if a.name.startswith('emi_nb.')}
    return out

def _code(nb:Path) -> str:
    "The notebook's code cells as one parseable source (IPython magics and shell lines dropped)."
    lines = []
    for c in nbformat.read(nb, 4).cells:
        if c.cell_type == 'code': lines += [l for l in c.source.splitlines() if not l.lstrip().startswith(('%', '!'))] + ['']
    return '\n'.join(lines)

def test_notebook_numbers_are_unique():
    nums = [p.stem[:2] for p in (ROOT/'nbs').glob('[0-9][0-9]_*.ipynb')]
    assert len(nums) == len(set(nums)), sorted(nums)

def test_one_module_per_notebook():
    mods = _modules()
    assert len({v[1] for v in mods.values()}) == len(mods)
    assert {p.stem for p in (ROOT/'emi_nb').glob('*.py') if not p.stem.startswith('_')} == set(mods)

def test_notebooks_import_only_backwards():
    mods = _modules()
    bad = []
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        n = _number(nb.stem)
        for m in _imports(_code(nb)):
            if m in mods and mods[m][0] > n: bad.append(f'{nb.stem} imports {m} ({mods[m][1]})')
    assert not bad, bad

def test_modules_import_only_backwards_and_without_cycles():
    mods = _modules()
    bad = []
    for py in sorted((ROOT/'emi_nb').glob('*.py')):
        if py.stem not in mods: continue
        for m in _imports(py.read_text(), package=True) - {py.stem}:
            if m in mods and mods[m][0] >= mods[py.stem][0]: bad.append(f'{py.stem} imports {m}')
    assert not bad, bad

def test_the_check_catches_a_forward_import(tmp_path):
    "The checker itself: a function-level import of a later module is found."
    src = "def f():\n    from emi_nb.train import fit\n    return fit\nfrom .config import SR\n"
    assert _imports(src, package=True) == {'train', 'config'}
