import subprocess
import sys

from peftkit.apps.cli import COMMANDS, main


def test_info_lists_methods_and_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0].rstrip(":") for line in out.splitlines() if line.startswith("  ")]
    assert {"kron", "lora", "oft"} <= set(listed) and "kron (also lokr)" in out and "torch" in out


def test_help_lists_every_command_and_unknown_command_fails(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_help_does_not_import_heavy_libraries():
    code = "import sys; from peftkit.apps.cli import main; main(['--help']); print(sorted(m for m in ('torch', 'diffusers', 'timm', 'gradio') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("[]")


def test_every_command_points_at_an_existing_function():
    import importlib

    for name, (module, func, _) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), func)), name


def test_the_script_exits_with_the_command_code():
    run = [sys.executable, "-m", "peftkit.apps.cli"]
    assert subprocess.run([*run, "--help"], capture_output=True).returncode == 0
    assert subprocess.run([*run, "nope"], capture_output=True).returncode == 2
