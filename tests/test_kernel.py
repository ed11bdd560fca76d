"A headless Jupyter server runs a study notebook through the registered `emi-study` kernel, as JupyterLab would."
import json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path
import nbformat, pytest
from conftest import ROOT, BIN
from emi_nb.site import directives
from emi_nb.study import KERNEL

NOTEBOOK = '00_config.ipynb'   # a study notebook that runs in seconds
SKIP_FLAGS = {'notest', 'cuda'}  # as nbdev_test

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

class Server:
    "A `jupyter server` subprocess on 127.0.0.1 with a token, isolated config and runtime folders."
    def __init__(self, root:Path, tmp:Path):
        self.root, self.port, self.token = root, _free_port(), secrets.token_hex(16)
        self.url = f'http://127.0.0.1:{self.port}'
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp/'config'), JUPYTER_RUNTIME_DIR=str(tmp/'runtime'),
                   JUPYTER_DATA_DIR=str(tmp/'data'), JUPYTER_PLATFORM_DIRS='1', HF_HUB_OFFLINE='1')
        env.pop('MPLBACKEND', None)  # a reader's JupyterLab: the kernel's own (inline) figures
        self.log = tmp/'server.log'
        cmd = [str(BIN/'jupyter'), 'server', '--no-browser', '--ip=127.0.0.1', f'--port={self.port}', '--ServerApp.port_retries=0',
               f'--IdentityProvider.token={self.token}', f'--ServerApp.root_dir={root}'] + (['--allow-root'] if os.geteuid() == 0 else [])
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, 'w'), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def api(self, method:str, path:str, body=None, timeout=30):
        req = urllib.request.Request(self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={'Authorization': f'token {self.token}', 'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
            return json.loads(data) if data else None

    def wait_ready(self, timeout=90):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None: raise AssertionError(f"jupyter server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try: return self.api('GET', '/api/status', timeout=5)
            except OSError: time.sleep(0.5)
        raise AssertionError(f"jupyter server not up after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT); self.proc.send_signal(signal.SIGINT)  # twice: no confirmation prompt
            try: self.proc.wait(20)
            except subprocess.TimeoutExpired: pass
        try: os.killpg(self.proc.pid, signal.SIGKILL)  # the server's own process group: anything left of it
        except ProcessLookupError: pass
        self.proc.wait(10)

@pytest.fixture(scope='module')
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('jupyter')
    root = tmp_path/'root'; root.mkdir()
    shutil.copy(ROOT/'nbs'/NOTEBOOK, root/NOTEBOOK)
    s = Server(root, tmp_path)
    try:
        s.wait_ready(); yield s
    finally: s.stop()

class KernelChannel:
    "The server's websocket to one kernel: send execute requests, collect outputs until the reply."
    def __init__(self, server:Server, kernel_id:str):
        import websocket
        self.session = uuid.uuid4().hex
        self.ws = websocket.create_connection(f'ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?session_id={self.session}',
                                              header=[f'Authorization: token {server.token}'], timeout=120)

    def execute(self, code:str, timeout=180) -> dict:
        "Run `code`; returns dict(status, outputs, error)."
        mid = uuid.uuid4().hex
        self.ws.send(json.dumps(dict(channel='shell', buffers=[], metadata={}, parent_header={},
            header=dict(msg_id=mid, msg_type='execute_request', username='test', session=self.session, version='5.3', date=''),
            content=dict(code=code, silent=False, store_history=True, user_expressions={}, allow_stdin=False, stop_on_error=True))))
        res, idle, reply, t0 = dict(outputs=[], status=None, error=None), False, False, time.time()
        while not (idle and reply):
            if time.time() - t0 > timeout: raise AssertionError(f"no reply within {timeout} s for:\n{code[:300]}")
            msg = json.loads(self.ws.recv())
            if msg.get('parent_header', {}).get('msg_id') != mid: continue
            t, c = msg['msg_type'], msg['content']
            if t == 'execute_reply': reply = True; res['status'] = c['status']
            elif t == 'status' and c.get('execution_state') == 'idle': idle = True
            elif t in ('stream', 'execute_result', 'display_data'): res['outputs'].append(c)
            elif t == 'error': res['error'] = f"{c['ename']}: {c['evalue']}\n" + '\n'.join(c.get('traceback', []))[-2000:]
        return res

    def close(self): self.ws.close()

def test_server_lists_the_study_kernel(server):
    specs = server.api('GET', '/api/kernelspecs')['kernelspecs']
    assert KERNEL in specs, f"kernel {KERNEL!r} not registered (make env registers it); found {sorted(specs)}"
    argv0 = specs[KERNEL]['spec']['argv'][0]
    assert Path(argv0).parent == Path(sys.executable).parent, f"{KERNEL} runs {argv0}, not this environment's python"

def test_notebook_runs_through_server_kernel(server):
    "Every cell nbdev_test would run of a study notebook, executed by the emi-study kernel the server started."
    sess = server.api('POST', '/api/sessions', dict(path=NOTEBOOK, name=NOTEBOOK, type='notebook', kernel=dict(name=KERNEL)))
    kid = sess['kernel']['id']
    assert sess['kernel']['name'] == KERNEL
    ch = KernelChannel(server, kid)
    try:
        nb = nbformat.read(server.root/NOTEBOOK, as_version=4)
        ran = 0
        for i, c in enumerate(nb.cells):
            if c.cell_type != 'code' or SKIP_FLAGS & directives(c.source).keys() or 'nbdev_export(' in c.source: continue
            r = ch.execute(c.source)
            assert r['status'] == 'ok', f"{NOTEBOOK} cell {i} failed in the server's kernel:\n{r['error']}"
            ran += 1
        r = ch.execute("import sys, os, emi_nb; print(sys.executable); print(os.getcwd()); print(emi_nb.__file__)")
        exe, cwd, mod = ''.join(o.get('text', '') for o in r['outputs']).split()
        assert Path(exe).parent == Path(sys.executable).parent and Path(cwd) == server.root
        assert Path(mod).resolve().is_relative_to(ROOT), f"the kernel imports emi_nb from {mod}"
        assert ran >= 10
    finally:
        ch.close()
        server.api('DELETE', f"/api/sessions/{sess['id']}")
    assert server.api('GET', '/api/kernels') == []
