"""The study website: _quarto.yml lists the notebooks in reading order; a run's site renders offline with code folded,
and in headless Chromium every study page reads provenance, findings (its first figure or table), then the machinery."""
import functools, http.server, json, os, re, shutil, threading, time
from pathlib import Path
import nbformat, pytest, yaml
from bs4 import BeautifulSoup
from conftest import ROOT, run_cli
from emi_nb.site import site_nav, nav_stems, nb_title, prepare_notebook, read_quarto
from emi_nb.study import study_notebooks

ARTIFACTS = ROOT/'test-artifacts'/'site'
CHROMIUM, CHROMEDRIVER = Path('/usr/bin/chromium'), Path('/usr/bin/chromedriver')
IMAGE_MIMES = ('image/png', 'image/jpeg', 'image/gif')
# the study pages that open with their findings: provenance box, `## Findings`, its first figure or table,
# `## How it works`. Still to be reordered: '08_train', '10_ablations', '11_vision', '12_benchmarks', 'index'.
STUDY_PAGES = ['04_data', '07_pretrain']

def _hrefs(x):
    "Every `href`/`file`/path entry of a navigation tree."
    if isinstance(x, str): yield x
    elif isinstance(x, dict):
        for k in ('href', 'file'):
            if isinstance(x.get(k), str): yield x[k]
        yield from _hrefs(x.get('contents') or [])
    elif isinstance(x, list):
        for v in x: yield from _hrefs(v)

def _local(h): return not re.match(r'^[a-z]+:', h)

# --- _quarto.yml -------------------------------------------------------------------------------------------------

def test_quarto_yml_pages_exist():
    "Every page, stylesheet and link _quarto.yml lists exists, the navbar links the repository, and code is folded."
    qy = yaml.safe_load((ROOT/'_quarto.yml').read_text())
    assert qy['format']['html']['code-fold'] is True and qy['format']['html']['code-summary'] == 'code'
    assert qy['project']['type'] == 'website' and qy['website']['title']
    web = qy['website']
    listed = [*qy['project']['render'], *_hrefs(web['sidebar']['contents']), *_hrefs(web['navbar'].get('left', [])),
              *_hrefs(web['navbar'].get('right', [])), *([qy['format']['html']['css']] if 'css' in qy['format']['html'] else [])]
    missing = sorted({h for h in listed if _local(h) and not (ROOT/h.split('#')[0]).exists()})
    assert not missing, f"_quarto.yml lists pages that do not exist: {missing}"
    assert any(not _local(h) and 'github.com' in h for h in _hrefs(web['navbar']['right'])), "navbar has no repo link"

def test_quarto_yml_reading_order():
    "The sidebar and the render list hold every notebook, front page first, then the order emi_study runs them in."
    qy = yaml.safe_load((ROOT/'_quarto.yml').read_text())
    nbs = study_notebooks(ROOT/'nbs')
    expected = ['nbs/index.ipynb'] + [f'nbs/{p.name}' for p in nbs if p.name != 'index.ipynb']
    assert [p for p in qy['project']['render'] if p.endswith('.ipynb')] == expected
    assert list(dict.fromkeys(_hrefs(qy['website']['sidebar']['contents']))) == expected
    assert nav_stems(site_nav(qy)) == [Path(p).stem for p in expected]

def test_nbdev_docs_config_matches():
    "nbdev_docs renders nbs/ with nbs/_quarto.yml and nbs/sidebar.yml: same pages, same order, same title."
    top = yaml.safe_load((ROOT/'_quarto.yml').read_text())
    side = yaml.safe_load((ROOT/'nbs/sidebar.yml').read_text())
    want = [h[len('nbs/'):] for h in _hrefs(top['website']['sidebar']['contents'])]
    assert list(_hrefs(side['website']['sidebar']['contents'])) == want
    nq = yaml.safe_load((ROOT/'nbs/_quarto.yml').read_text())
    assert nq['project']['type'] == 'website' and 'sidebar.yml' in nq['metadata-files']
    assert (ROOT/'nbs'/nq['format']['html']['css']).exists() and nq['format']['html']['code-fold'] is True

# --- offline rendering -------------------------------------------------------------------------------------------

def _visible_images(nb) -> int:
    "Image outputs a page of `nb` shows."
    return sum(1 for c in prepare_notebook(nb).cells if c.cell_type == 'code' and 'remove-output' not in c.metadata.get('tags', [])
               for o in c.get('outputs', []) if any(m in o.get('data', {}) for m in IMAGE_MIMES))

def test_smoke_site_offline(smoke_run):
    "Every executed notebook has its page: one provenance box, no hidden cell, no remote resource, every figure, every code input in a closed <details>."
    site = smoke_run/'site'
    executed = sorted(p.stem for p in (smoke_run/'notebooks').glob('*.ipynb'))
    assert sorted(p.stem for p in site.glob('*.html')) == executed
    assert (site/'emi.css').exists() and (site/'mathjax/MathJax.js').exists()
    for stem in executed:
        page = (site/f'{stem}.html').read_text()
        assert page.count('<div class="emi-provenance">') == 1, stem
        assert 'SYNTHETIC' in page and 'smoke' in page, f"{stem}: provenance box does not name data and profile"
        soup = BeautifulSoup(page, 'html.parser')
        code = [e.get_text() for e in soup.select('.jp-InputArea .highlight pre')]
        inputs = soup.select('.jp-CodeCell .jp-InputArea')
        assert all((d := i.find_parent('details')) and 'emi-code' in d.get('class', []) and not d.has_attr('open')
                   for i in inputs), f"{stem}: a code input not folded"
        assert not any(o.find_parent('details') for o in soup.select('.jp-OutputArea')), f"{stem}: an output folded"
        shown = [c for c in code if 'nbdev_export(' in c or c.lstrip().startswith('# Parameters') or re.search(r'^\s*#\|', c, re.M)]
        assert not shown, f"{stem}: hidden cells or directive lines shown: {shown}"
        assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', page), f"{stem}: page loads a remote resource"
        nb = nbformat.read(smoke_run/f'notebooks/{stem}.ipynb', as_version=4)
        assert page.count('src="data:image/') >= _visible_images(nb), f"{stem}: figures missing"
    man = json.loads((smoke_run/'manifest.json').read_text())
    assert man['site'] == str(site/'index.html')

def test_partial_run_gets_front_page(tmp_path):
    "A run of one notebook still has a front page (with the paper-vs-here table) and greys out the pages it did not run."
    r = run_cli('emi_study', '--profile', 'smoke', '--only', '00', '--run-dir', tmp_path/'run')
    site = tmp_path/'run/site'
    assert f"site: {site/'index.html'}" in r.stdout
    index = (site/'index.html').read_text()
    assert 'href="00_config.html"' in index and '(not run)' in index and 'paper ρ_VAL (quoted)' in index
    assert 'not run' in index and 'emi-provenance' in index

# --- headless Chromium -------------------------------------------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass

def serve(folder:Path):
    "A threaded HTTP server of `folder` on a free port of 127.0.0.1; returns (server, base URL)."
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f'http://127.0.0.1:{srv.server_address[1]}'

def chromium(tmp:Path):
    "Headless Chromium under Selenium with the system chromedriver; no driver download, no background network."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    os.environ['SE_OFFLINE'] = 'true'
    o = webdriver.ChromeOptions()
    o.binary_location = str(CHROMIUM)
    for a in ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
              '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-quic', '--disable-extensions',
              '--window-size=1366,1000', f'--user-data-dir={tmp}']: o.add_argument(a)
    o.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    d = webdriver.Chrome(options=o, service=Service(executable_path=str(CHROMEDRIVER)))
    d.set_page_load_timeout(60); d.set_script_timeout(60)
    return d

# where the page's parts are: the provenance box, the `## Findings` and `## How it works` headings, the first figure or
# table outside the box; whether each comes before the next; and the code inputs that show (unfolded)
PAGE_SHAPE = """const main = document.querySelector('main');
const name = h => h.textContent.replace('¶', '').trim();
const h2 = Array.from(main.querySelectorAll('h2'));
const box = main.querySelector('.emi-provenance'), findings = h2.find(h => name(h) === 'Findings'),
      how = h2.find(h => name(h) === 'How it works');
const first = Array.from(main.querySelectorAll('img, table')).find(e => !e.closest('.emi-provenance'));
const before = (a, b) => !!(a && b && (a.compareDocumentPosition(b) & Node.DOCUMENT_POSITION_FOLLOWING));
const inputs = Array.from(main.querySelectorAll('.jp-CodeCell .jp-InputArea'));
return {box: !!box, findings: !!findings, how: !!how, first: first ? first.tagName.toLowerCase() : null,
        order: before(box, findings) && before(findings, first) && before(first, how),
        inputs: inputs.length, shown_inputs: inputs.filter(i => i.checkVisibility()).length,
        hidden_outputs: Array.from(main.querySelectorAll('.jp-OutputArea')).filter(o => !o.checkVisibility() && o.closest('details')).length};"""

MATHJAX_DONE = """const done = arguments[arguments.length - 1];
if (!(window.MathJax && MathJax.Hub)) { done('no MathJax'); return; }
MathJax.Hub.Queue(() => done('ok'));"""

def browse_site(site:Path, run_dir:Path, artifacts:Path, tmp:Path) -> dict:
    "Open the front page, follow every navigation link, check each page; returns {stem: findings} and saves screenshots."
    nav = site_nav(read_quarto())
    figure_pages = {p['stem'] for s in nav['sections'] if s['title'] in ('Data', 'Results') for p in s['pages']}
    artifacts.mkdir(parents=True, exist_ok=True)
    for p in artifacts.glob('*.png'): p.unlink()
    srv, base = serve(site); drv = chromium(tmp)
    found, errors = {}, []
    try:
        drv.get(f'{base}/index.html')
        from selenium.webdriver.support.ui import WebDriverWait
        nav_links = lambda d: d.find_elements('css selector', 'header.emi-navbar a[href], nav.emi-sidebar a[href]')
        links = [a.get_attribute('href') for a in WebDriverWait(drv, 60).until(nav_links)]
        pages = list(dict.fromkeys(h.split('#')[0] for h in links if h.startswith(base)))
        assert f'{base}/index.html' in pages
        for url in pages:
            stem = url[len(base)+1:].removesuffix('.html')
            drv.get(url)
            mj = drv.execute_async_script(MATHJAX_DONE)
            h1 = [e.text.strip() for e in drv.find_elements('css selector', 'main h1') if e.text.strip()]
            imgs = drv.execute_script("return Array.from(document.querySelectorAll('main img')).map(i => [i.complete, i.naturalWidth]);")
            math = drv.execute_script("return document.querySelectorAll('.MathJax, .MathJax_Display, .MathJax_MathML').length;")
            box = drv.execute_script("const b = document.querySelector('.emi-provenance'); return b ? b.innerText : '';")
            shape = drv.execute_script(PAGE_SHAPE)
            shot = artifacts/f'{stem}.png'; drv.save_screenshot(str(shot))
            if imgs:  # a second view, centred on the page's first figure
                drv.execute_script("document.querySelector('main img').scrollIntoView({block: 'center'});")
                drv.save_screenshot(str(artifacts/f'{stem}-figure.png'))
            errors += [(stem, e['message']) for e in drv.get_log('browser') if e['level'] == 'SEVERE']
            found[stem] = dict(url=url, mathjax=mj, h1=h1, images=imgs, math=math, box=box, shape=shape, screenshot=shot, figure_page=stem in figure_pages)
    finally:
        drv.quit(); srv.shutdown(); srv.server_close()
    assert not errors, f"browser console errors: {errors}"
    return found

def test_site_in_browser(smoke_run, tmp_path):
    "Every page is reachable from the front page, typesets its math, names its provenance, shows its figures with code folded; the front page shows a figure."
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "Chromium missing: run `make browser` (apt packages chromium, chromium-driver)"
    found = browse_site(smoke_run/'site', smoke_run, ARTIFACTS, tmp_path/'chromium-profile')
    executed = {p.stem: nbformat.read(p, as_version=4) for p in (smoke_run/'notebooks').glob('*.ipynb')}
    assert set(found) == set(executed), f"navigation reaches {sorted(found)}, the run executed {sorted(executed)}"
    n_figs = 0
    for stem, f in found.items():
        assert f['mathjax'] == 'ok', f"{stem}: MathJax did not load"
        assert f['h1'] and f['h1'][0] == nb_title(executed[stem], stem)[0], f"{stem}: heading {f['h1'][:1]}"
        assert 'SYNTHETIC' in f['box'] and 'Profile' in f['box'] and 'Commit' in f['box'], f"{stem}: provenance box {f['box']!r}"
        if f['figure_page']:
            want = _visible_images(executed[stem]); n_figs += want
            assert len(f['images']) >= want and all(ok and w > 0 for ok, w in f['images']), f"{stem}: figures {f['images']} (expected {want})"
    assert n_figs > 0 or not any(f['figure_page'] for f in found.values()), "the data and results pages show no figures"
    assert found['14_site']['math'] > 0, "math on the site page was not typeset"
    assert found['index']['images'], "the front page shows no figure"
    unfolded = {s: f['shape'] for s, f in found.items() if f['shape']['shown_inputs'] or f['shape']['hidden_outputs']}
    assert not unfolded, f"pages with code not folded or outputs hidden: {unfolded}"
    shots = sorted(str(p) for p in ARTIFACTS.glob('*.png'))
    assert all(Path(s).stat().st_size > 10_000 for s in shots)
    (ARTIFACTS/'screenshots.txt').write_text('\n'.join(shots) + '\n')
    print('screenshots:', *shots, sep='\n  ')

def test_study_pages_findings_first(smoke_run, tmp_path):
    "On each page of STUDY_PAGES the provenance box comes first, then `## Findings`, then its first figure or table, then `## How it works`."
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "Chromium missing: run `make browser` (apt packages chromium, chromium-driver)"
    missing = [s for s in STUDY_PAGES if not (smoke_run/'site'/f'{s}.html').exists()]
    assert not missing, f"study pages the run did not render: {missing}"
    srv, base = serve(smoke_run/'site'); drv = chromium(tmp_path/'chromium-profile')
    try:
        shapes = {}
        for stem in STUDY_PAGES:
            drv.get(f'{base}/{stem}.html')
            shapes[stem] = drv.execute_script(PAGE_SHAPE)
    finally:
        drv.quit(); srv.shutdown(); srv.server_close()
    wrong = {s: {k: v for k, v in sh.items() if k in ('box', 'findings', 'first', 'how')} for s, sh in shapes.items() if not sh['order']}
    print('study pages checked:', *STUDY_PAGES)
    assert not wrong, f"study pages not in the order provenance, ## Findings, first figure or table, ## How it works: {wrong}"
