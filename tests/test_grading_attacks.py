"""Grading that a submission cannot forge (issue 20): every route a determined student tried, graded once.

One class folder holds an honest student, an untouched lab, a victim and one submission per attack,
all for a small lab with a number exercise (``my_chance``, whose library reference is taken away), a
tensor exercise with gradients (``my_unit``) and a training exercise that the grader computes, plus one
submission of lab 9 that forges its two-process values. A single module-scoped ``grade_dir`` run grades
them (one sandboxed process each, under a memory limit); the tests read its rows. Each attack targets one
exercise: that row earns 0, the other rows equal the honest student's, and the victim graded after the
attacks gets exactly the honest grade.
"""

import csv
import json
import textwrap
import time

import pytest

from mmalign import labs
from mmalign.labs import sandbox

from test_course import ROOT

from test_labs_tooling import HEADER, nbgrader, submission

UNIT = HEADER + f'''
# %%
import math

import torch

# %% {nbgrader("chance_impl", grade=False, solution=True)}
def my_chance(n_gallery, n_positives, k):
    """Recall@k of a random ranking."""
    ### BEGIN SOLUTION
    return 1 - math.comb(n_gallery - n_positives, k) / math.comb(n_gallery, k)
    ### END SOLUTION


# %% {nbgrader("chance_test", grade=True, solution=False, points=2)}
from mmalign.retrieval import chance_recall

got = my_chance(100, 1, 10)
assert math.isclose(got, 0.1, rel_tol=1e-9), f"expected 0.1, got {{got}}"
### BEGIN HIDDEN TESTS
for g, p, k in ((50, 2, 5), (10, 3, 4), (7, 1, 7)):
    assert math.isclose(my_chance(g, p, k), chance_recall(g, p, k), rel_tol=1e-9)
### END HIDDEN TESTS

# %% {nbgrader("unit_impl", grade=False, solution=True)}
def my_unit(x):
    """Rows scaled to unit norm: (N, D) -> (N, D)."""
    ### BEGIN SOLUTION
    return x / x.norm(dim=1, keepdim=True)
    ### END SOLUTION


# %% {nbgrader("unit_test", grade=True, solution=False, points=3)}
x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
assert torch.allclose(my_unit(x), x / x.norm(dim=1, keepdim=True)), f"expected unit rows, got {{my_unit(x)}}"
### BEGIN HIDDEN TESTS
g_mine, = torch.autograd.grad(my_unit(x)[:, 0].sum(), x)
g_ref, = torch.autograd.grad((x / x.norm(dim=1, keepdim=True))[:, 0].sum(), x)
assert torch.allclose(g_mine, g_ref), f"expected the gradient {{g_ref}}, got {{g_mine}}"
assert my_unit(torch.eye(2)).dtype == torch.float32
### END HIDDEN TESTS

# %%
losses = []  # the student's own training run (never read by the grader)

# %% {nbgrader("train_test", grade=True, solution=False, points=1)}
target = torch.tensor([[0.6, 0.8]])
w = torch.tensor([[1.0, 0.1]], requires_grad=True)
opt = torch.optim.SGD([w], lr=0.5)
test_losses = []
for _ in range(15):
    opt.zero_grad()
    loss = -(my_unit(w) * target).sum()  # minus the cosine: -1 at best
    loss.backward()
    opt.step()
    test_losses.append(float(loss.detach()))
assert -1 - 1e-6 < test_losses[-1] < -0.999, f"expected the loss to reach -1, got {{test_losses[0]}} -> {{test_losses[-1]}}"
'''

CHANCE_OK = ("def my_chance(n_gallery, n_positives, k):\n"
             "    return 1 - math.comb(n_gallery - n_positives, k) / math.comb(n_gallery, k)")
UNIT_OK = "def my_unit(x):\n    return x / x.norm(dim=1, keepdim=True)"
CHANCE_WRONG = "def my_chance(n_gallery, n_positives, k):\n    return 0.0"
HONEST = {"chance_test": 2, "unit_test": 3, "train_test": 1}
NO_CHANCE = {"chance_test": 0, "unit_test": 3, "train_test": 1}
NO_UNIT = {"chance_test": 2, "unit_test": 0, "train_test": 0}
NOTHING = {"chance_test": 0, "unit_test": 0, "train_test": 0}

# name: (answer cells, extra cells put after the imports, expected points, sandbox needed to hold)
ATTACKS = {
    "session_send": ({"chance_impl": CHANCE_WRONG}, ["import jupyter_client.session as s\n"
                          "s.Session.send = lambda self, *a, **k: None  # failed tests would report success"],
                     NO_CHANCE, False),
    "assert_stripping": ({"chance_impl": CHANCE_WRONG}, ["import codeop\n\n"
                              "class Strip(type(get_ipython().compile)):\n"
                              "    def __call__(self, source, filename, symbol):\n"
                              "        return compile(source, filename, symbol, self.flags, True, optimize=1)\n\n"
                              "get_ipython().compile = Strip()\n"
                              "assert False, 'asserts are stripped from here on'"], NO_CHANCE, False),
    "token_forgery": ({"chance_impl": CHANCE_WRONG}, ["history = '\\n'.join(In)\n"
                           "print('mmalign-guard before chance_test', 'f' * 32)\n"
                           "print('mmalign-guard after chance_test', 'f' * 32)\n"
                           "procs = [open(p, 'rb').read() for p in __import__('glob').glob('/proc/[0-9]*/cmdline')]"],
                      NO_CHANCE, False),
    "name_shadowing": ({"chance_impl": CHANCE_WRONG}, ["class AlwaysClose:\n"
                            "    comb = staticmethod(math.comb)\n"
                            "    isclose = staticmethod(lambda *a, **k: True)\n\n"
                            "math = AlwaysClose()\n"
                            "torch.allclose = lambda *a, **k: True\n"
                            "isclose = math.isclose"], NO_CHANCE, False),
    "fake_tensor": ({"unit_impl": "class Agreeable(torch.Tensor):\n"
                                  "    def __eq__(self, other):\n        return True\n\n"
                                  "def my_unit(x):\n    return torch.zeros_like(x).as_subclass(Agreeable)"},
                    [], NO_UNIT, False),
    "fake_object": ({"unit_impl": "class Agreeable:\n"
                                  "    def __eq__(self, other):\n        return True\n"
                                  "    def __getattr__(self, name):\n        return lambda *a, **k: self\n"
                                  "    def __float__(self):\n        return 0.0\n\n"
                                  "def my_unit(x):\n    return Agreeable()"}, [], NO_UNIT, False),
    "thread_reference": ({"chance_impl": "import threading\nfrom mmalign.retrieval import chance_recall\n\n"
                                         "def my_chance(n_gallery, n_positives, k):\n    out = {}\n"
                                         "    def work():\n"
                                         "        out['v'] = chance_recall(n_gallery, n_positives, k)\n"
                                         "    t = threading.Thread(target=work)\n    t.start()\n    t.join()\n"
                                         "    return out.get('v', 0.0)"}, [], NO_CHANCE, False),
    "closure_reference": ({"chance_impl": "from mmalign.retrieval import chance_recall\n"
                                          "found = [chance_recall, getattr(chance_recall, '__wrapped__', None)]\n"
                                          "found += [c.cell_contents for c in chance_recall.__closure__ or ()]\n\n"
                                          "def my_chance(n_gallery, n_positives, k):\n"
                                          "    for f in found:\n"
                                          "        try:\n            return f(n_gallery, n_positives, k)\n"
                                          "        except Exception:\n            pass\n    return 0.0"},
                          [], NO_CHANCE, False),
    "default_argument": ({"chance_impl": "from mmalign.retrieval import chance_recall\n\n"
                                         "def my_chance(n_gallery, n_positives, k, _ref=chance_recall):\n"
                                         "    return _ref(n_gallery, n_positives, k)"}, [], NO_CHANCE, False),
    "callable_instance": ({"chance_impl": "import mmalign.retrieval as r\n\n"
                                          "class Caller:\n    def __call__(self, *args):\n"
                                          "        return getattr(r, 'chance_' + 'recall')(*args)\n\n"
                                          "my_chance = Caller()"}, [], NO_CHANCE, False),
    "forged_training": ({"unit_impl": "def my_unit(x):\n    return x"},
                        ["losses = [1.0, 0.0]\ntest_losses = [1.0, 0.0]\nhistory = {'loss': [1.0, 0.0]}"],
                        NO_UNIT, False),
    "reads_solutions": ({"chance_impl": CHANCE_WRONG}, ["import re\ntry:\n"
                                                        "    text = open(SOLUTION).read()\n"
                                                        "    body = re.search(r'def my_chance.*?### END SOLUTION', text, re.S)[0]\n"
                                                        "    exec(body.replace('### BEGIN SOLUTION', ''))\n"
                                                        "except OSError:\n    pass"], NO_CHANCE, True),
    "a_cross_writes": ({"chance_impl": CHANCE_WRONG}, ["import pathlib\nfor path in (VICTIM, SOLUTION):\n"
                                                       "    try:\n        pathlib.Path(path).write_text('{}')\n"
                                                       "    except OSError:\n        pass"], NO_CHANCE, False),
    "b_startup_file": ({"chance_impl": CHANCE_WRONG}, [
        "import os, pathlib\nfor home in (os.environ['HOME'], os.path.expanduser('~')):\n"
        "    d = pathlib.Path(home, '.ipython', 'profile_default', 'startup')\n"
        "    try:\n        d.mkdir(parents=True, exist_ok=True)\n"
        "        (d / '00-class.py').write_text('def my_chance(*a):\\n    return 0.0\\n')\n"
        "    except OSError:\n        pass"], NO_CHANCE, False),
    "a_detached_process": ({"chance_impl": CHANCE_WRONG}, [
        "import subprocess, sys\n"
        "code = f'import time; time.sleep(2); open({CSV!r}, \"w\").write(\"student,lab,score,max,notes\\\\n\")'\n"
        "subprocess.Popen([sys.executable, '-c', code], start_new_session=True,\n"
        "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"], NO_CHANCE, True),
    "malformed_message": ({}, ["import os\nfor fd in range(3, 16):\n    try:\n"
                               "        os.write(fd, b'\\xff' * 64)\n    except OSError:\n        pass"],
                          NOTHING, False),
    "ignores_interrupts": ({"chance_impl": "import signal\n\ndef my_chance(n_gallery, n_positives, k):\n"
                                           "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                                           "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                                           "    while True:\n        pass"}, [], NO_CHANCE, False),
    "exec_library_source": ({"chance_impl": "import inspect\nimport mmalign.retrieval as r\n"
                                            "copy = {'__name__': 'mmalign.copy', '__package__': 'mmalign'}\n"
                                            "exec(inspect.getsource(r), copy)\n"
                                            "my_chance = copy['chance_recall']"}, [], HONEST, False),
    "reload_reference": ({"chance_impl": "import importlib\nimport mmalign.retrieval as r\n\n"
                                         "my_chance = importlib.reload(r).chance_recall"}, [], HONEST, False),
    "memory_hog": ({"unit_impl": "def my_unit(x):\n    hog = []\n"
                                 "    for _ in range(MEMORY_LIMIT // 256 + 8):  # 256 MiB a step, up to 2 GiB past the limit\n"
                                 "        hog.append(torch.ones(2**25, dtype=torch.float64))\n"
                                 "    return x / x.norm(dim=1, keepdim=True)"}, [], NO_UNIT, False),
}
# what a person must read: exec of the library's source and reloading it give the reference back (full
# marks); the review report lists them with the line
ONLY_REVIEWED = {"exec_library_source": "exec(inspect.getsource(r), copy)",
                 "reload_reference": "my_chance = importlib.reload(r).chance_recall"}
# lab 9 with a loss that is right in one process only (no rank offset) and every two-process value forged
# in the student's processes: the test helpers patched, and the variables the visible check reads
FORGED_RANKS = """def my_gathered_info_nce(a, b, temperature):
    target = torch.arange(a.shape[0])
    all_a, all_b = dist.all_gather(a), dist.all_gather(b)
    return 0.5 * (F.cross_entropy(similarity(a, all_b) / temperature, target)
                  + F.cross_entropy(similarity(b, all_a) / temperature, target))


import mmalign.labs.testing as testing

testing.on_processes = lambda function, inputs: [(torch.tensor(0.0), [None, None]) for _ in inputs]
testing.grading = lambda: False
two = single = {"loss": 0.0, "grad_a": torch.zeros(16, 6), "grad_b": torch.zeros(16, 6)}"""
MEMORY_LIMIT = 2560  # MiB: the class's limit; lab 9's three processes hold about 1.7 GiB
FLAGGED = {"session_send": "kernel or IPython internals", "assert_stripping": "kernel or IPython internals",
           "token_forgery": "/proc", "closure_reference": "closures and code objects",
           "thread_reference": "threads or processes", "a_detached_process": "starting processes",
           "exec_library_source": "executing source text", "reads_solutions": "executing source text",
           "reload_reference": "import machinery"}
TIMEOUT = 6


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    solution = root / "solutions" / "01_unit.py"
    solution.parent.mkdir()
    solution.write_text(UNIT, encoding="utf-8")
    lab = labs.generate_lab(solution)
    subs = root / "subs"
    csv_path = root / "out" / "grades.csv"
    victim = subs / "zz_victim" / "01_unit.ipynb"
    constants = (f"SOLUTION = {str(solution)!r}\nVICTIM = {str(victim)!r}\nCSV = {str(csv_path)!r}\n"
                 f"MEMORY_LIMIT = {MEMORY_LIMIT}")
    honest = submission(lab, {"chance_impl": CHANCE_OK, "unit_impl": UNIT_OK})
    labs.write_lab(honest, subs / "honest" / "01_unit.ipynb")
    labs.write_lab(honest, victim)
    labs.write_lab(lab, subs / "untouched" / "01_unit.ipynb")
    for name, (answers, extra, _, needs_sandbox) in ATTACKS.items():
        if needs_sandbox and not sandbox.bubblewrap():
            continue  # outside a sandbox these routes work: they would change this very class folder
        nb = submission(lab, {"chance_impl": CHANCE_OK, "unit_impl": UNIT_OK, **answers})
        for offset, source in enumerate([constants, *extra]):
            code = labs.grading.nbformat.v4.new_code_cell(source)
            code.id = f"extra-{offset}"
            nb.cells.insert(1 + offset, code)
        labs.write_lab(nb, subs / name / "01_unit.ipynb")
    (root / "solutions" / "09_scaling.py").write_bytes((ROOT / "solutions" / "09_scaling.py").read_bytes())
    lab9 = labs.generate_lab(root / "solutions" / "09_scaling.py")
    labs.write_lab(submission(lab9, {"local_loss_impl": FORGED_RANKS}), subs / "forged_ranks" / "09_scaling.ipynb")
    solution_text = solution.read_text()
    start = time.monotonic()
    times = []

    def log(line):
        times.append((round(time.monotonic() - start, 1), line[:60]))

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MMALIGN_PROFILE", raising=False)
        rows = labs.grade_dir(subs, root / "solutions", csv_path, timeout=TIMEOUT, log=log,
                              memory_limit=MEMORY_LIMIT)
    seconds = time.monotonic() - start
    time.sleep(max(0.0, 3.0 - seconds))  # a detached process of the first submission had its chance to act
    with open(csv_path, newline="") as f:
        table = {row["student"]: row for row in csv.DictReader(f)}
    return {"rows": {row["student"]: row for row in rows}, "csv": table, "root": root, "victim": victim,
            "solution": solution, "solution_text": solution_text, "honest_bytes": labs.lab_text(honest),
            "review": (csv_path.with_name("grades.review.txt")).read_text(), "seconds": seconds, "log": times}


def earned(row):
    return {cell["grade_id"]: cell["earned"] for cell in row["result"]["cells"]}


def test_honest_full_untouched_zero_and_sandboxed(attacked):
    rows = attacked["rows"]
    assert earned(rows["honest"]) == HONEST and earned(rows["untouched"]) == dict.fromkeys(HONEST, 0)
    assert all("NotImplementedError" in cell["error"] for cell in rows["untouched"]["result"]["cells"])
    assert rows["honest"]["result"]["review"] == [] and rows["honest"]["notes"] == (
        "" if sandbox.bubblewrap() else sandbox.NO_SANDBOX)


@pytest.mark.parametrize("name", ATTACKS, ids=list(ATTACKS))
def test_attack_earns_nothing_for_its_exercise(attacked, name):
    *_, expected, needs_sandbox = ATTACKS[name]
    if needs_sandbox and not sandbox.bubblewrap():
        pytest.skip("this route is only closed by the sandbox (bubblewrap), which is not available here")
    row = attacked["rows"][name]
    assert row["result"] is not None, row["notes"]
    assert earned(row) == expected, (json.dumps(row["result"]["cells"], indent=1), attacked["log"])
    assert attacked["csv"][name]["score"] == str(sum(expected.values()))


def test_wrong_values_say_why_without_hidden_source(attacked):
    cells = {c["grade_id"]: c for c in attacked["rows"]["fake_tensor"]["result"]["cells"]}
    assert "returned Agreeable, not a plain tensor" in cells["unit_test"]["error"]
    cells = {c["grade_id"]: c for c in attacked["rows"]["name_shadowing"]["result"]["cells"]}
    assert cells["chance_test"]["error"] == "AssertionError: expected 0.1, got 0.0"
    cells = {c["grade_id"]: c for c in attacked["rows"]["thread_reference"]["result"]["cells"]}
    assert cells["chance_test"]["error"] == "AssertionError: expected 0.1, got 0.0"
    cells = {c["grade_id"]: c for c in attacked["rows"]["default_argument"]["result"]["cells"]}
    assert "this lab asks you to write mmalign.retrieval.chance_recall yourself" in cells["chance_test"]["error"]
    cells = {c["grade_id"]: c for c in attacked["rows"]["ignores_interrupts"]["result"]["cells"]}
    assert "time limit" in cells["chance_test"]["error"]
    # a hidden assert without a message: the report never quotes the hidden line
    wrong_hidden = {c["grade_id"]: c for c in attacked["rows"]["forged_training"]["result"]["cells"]}
    for cell in wrong_hidden.values():
        assert "chance_recall(g, p, k)" not in (cell["error"] or "") and "g_ref" not in (cell["error"] or "")


def test_other_submissions_are_untouched(attacked):
    rows = attacked["rows"]
    assert earned(rows["zz_victim"]) == HONEST and rows["zz_victim"]["result"]["problems"] == \
        rows["honest"]["result"]["problems"]
    assert attacked["csv"]["zz_victim"]["score"] == "6" and len(attacked["csv"]) == len(rows)
    if sandbox.bubblewrap():
        assert attacked["victim"].read_text() == attacked["honest_bytes"]
        assert attacked["solution"].read_text() == attacked["solution_text"]


def test_suspicious_code_is_listed_for_review(attacked):
    review = attacked["review"]
    for name, why in FLAGGED.items():
        if name not in attacked["rows"]:
            continue
        flagged = attacked["rows"][name]["result"]["review"]
        assert any(why in f["why"] for f in flagged), (name, flagged)
        assert f"{name}/01_unit:" in review
    listed = {line[:-1] for line in review.splitlines() if line.endswith("/01_unit:")}
    assert listed.isdisjoint({"honest/01_unit", "zz_victim/01_unit", "untouched/01_unit"}), listed


def test_library_stub_in_the_students_process(attacked, tmp_path):
    solution = tmp_path / "01_unit.py"  # as read before grading: without bubblewrap a_cross_writes changes it
    solution.write_text(attacked["solution_text"], encoding="utf-8")
    config = labs.lab_config(labs.solution_as_notebook(solution))
    assert config["answers"] == ["my_chance", "my_unit"]
    assert config["references"] == [("mmalign.retrieval", "chance_recall")]


def test_output_paths_are_checked_before_grading(attacked, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    sub = attacked["root"] / "subs" / "honest" / "01_unit.ipynb"
    start = time.monotonic()
    assert labs.main(["grade", str(sub), "--solution", str(attacked["solution"]),
                      "--json", str(blocker / "out.json")]) == 2
    assert labs.main(["grade-dir", str(attacked["root"] / "subs"), "--solutions", str(attacked["root"] / "solutions"),
                      "--csv", str(blocker / "grades.csv")]) == 2
    assert time.monotonic() - start < 5  # refused before any submission ran
    err = capsys.readouterr().err
    assert err.count(f"cannot write {blocker}") == 2


def test_a_failed_write_prints_the_grades(tmp_path, capsys, monkeypatch):
    def refuse(path, text):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(labs.grading, "write_atomic", refuse)
    assert labs.grading.save_or_print(tmp_path / "g.csv", "student,lab\nalice,00\n", "grades") is False
    out = capsys.readouterr().out
    assert "could not write the grades" in out and "alice,00" in out


def test_malformed_notebook_and_grader_failures_keep_the_class(tmp_path):
    solution = tmp_path / "solutions" / "01_unit.py"
    solution.parent.mkdir()
    solution.write_text(UNIT, encoding="utf-8")
    (tmp_path / "subs" / "eve").mkdir(parents=True)
    (tmp_path / "subs" / "eve" / "01_unit.ipynb").write_bytes(b"\xff\xfe not json")
    (tmp_path / "subs" / "frank").mkdir()
    (tmp_path / "subs" / "frank" / "99_none.ipynb").write_text("{}")
    rows = labs.grade_dir(tmp_path / "subs", tmp_path / "solutions", log=lambda line: None)
    notes = {row["student"]: row["notes"] for row in rows}
    assert "not a readable Jupyter notebook" in notes["eve"] and "no solution" in notes["frank"]
    assert (tmp_path / "subs" / "grades.csv").read_text().count("\n") == 3


def test_the_sandbox_hides_the_repository():
    if not sandbox.bubblewrap():
        pytest.skip("bubblewrap is not available: " + sandbox.NO_SANDBOX)
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        env = sandbox.environment(Path(tmp), "ci")
        code = textwrap.dedent("""
            import os, socket
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__import__('mmalign').__file__))))
            print(sorted(os.listdir(root)), os.environ['HOME'] == os.getcwd(), 'SECRET' in os.environ)
            print(socket.socket().connect_ex(('1.1.1.1', 80)) != 0)
        """)
        cmd, popen_env, sandboxed = sandbox.command([sys.executable, "-I", "-c", code], Path(tmp), env)
        out = subprocess.run(cmd, env=popen_env, capture_output=True, text=True, timeout=60,
                             cwd=tmp).stdout.split("\n")
    assert sandboxed
    assert "solutions" not in out[0] and "tests" not in out[0] and out[0].endswith("True False")
    assert out[1] == "True"


def test_forged_two_process_values_earn_nothing(attacked):
    """Lab 9: the grader starts the two processes itself and compares what the function returns there."""
    row = attacked["rows"]["forged_ranks"]
    assert row["result"] is not None, row["notes"]
    assert earned(row) == {"one_process_test": 2, "two_process_test": 0}, row["result"]["cells"]
    error = {c["grade_id"]: c["error"] for c in row["result"]["cells"]}["two_process_test"]
    assert error.startswith("AssertionError: 2 processes: expected the single-process loss "), error
    assert attacked["csv"]["forged_ranks"]["score"] == "2"


def test_the_librarys_gathered_loss_is_taken_away_in_lab_9():
    """The exercise re-implements dist.gathered_info_nce, which no test calls: the lab declares it, so it is
    among the references that the student's processes get as stubs (the stubbing of a reference is what the
    alias, closure, thread and default-argument routes above test)."""
    import jupytext

    references = labs.grading.lab_config(jupytext.read(ROOT / "solutions" / "09_scaling.py"))["references"]
    assert ("mmalign.dist", "gathered_info_nce") in references
    assert ("mmalign.losses", "info_nce") in references  # the one the tests call, found as before


def test_a_memory_hog_scores_zero_for_its_exercise_and_the_class_is_graded(attacked):
    row = attacked["rows"]["memory_hog"]
    cells = {c["grade_id"]: c for c in row["result"]["cells"]}
    reason = f"memory limit {MEMORY_LIMIT} MiB exceeded"
    assert cells["unit_test"]["error"] == reason and cells["train_test"]["error"] == reason
    assert reason in row["notes"] and reason in attacked["csv"]["memory_hog"]["notes"]
    assert row["result"]["memory_peak_mib"] > MEMORY_LIMIT  # measured, then killed
    honest = attacked["rows"]["honest"]["result"]["memory_peak_mib"]
    assert 0 < honest < MEMORY_LIMIT / 2, honest


@pytest.mark.parametrize("name", ONLY_REVIEWED, ids=list(ONLY_REVIEWED))
def test_library_source_copies_are_listed_with_their_line(attacked, name):
    """exec of the library's source or a reload gives the reference back: a person reads the line."""
    flagged = attacked["rows"][name]["result"]["review"]
    assert any(f["text"] == ONLY_REVIEWED[name] for f in flagged), flagged
    block = attacked["review"].split(f"{name}/01_unit:\n", 1)[1].split("\n\n", 1)[0]
    line = next(f for f in flagged if f["text"] == ONLY_REVIEWED[name])
    assert f"  cell {line['cell'] + 1}, line {line['line']}: {ONLY_REVIEWED[name]}    [" in block, block
