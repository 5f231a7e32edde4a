"""The docs: links resolve, every README command parses, every option has a help line."""
import argparse
import dataclasses
import glob
import os
import re
import shlex

import pytest

import config
import demo
import train
from conftest import parser_of

DOCS = [os.path.join(config.ROOT, "README.md")] + sorted(glob.glob(os.path.join(config.ROOT, "docs", "*.md")))


LINK = re.compile(r"\]\(([^)\s]+)\)")


def readme_commands():
    """Every `python SCRIPT.py ...` line of the README's shell blocks, and every one quoted inline (the
    results' and the speed table's), as (script, args)."""
    text = open(DOCS[0]).read()
    inline = [q.replace("\n", " ") for q in re.findall(r"`(python [a-z_]+\.py[^`]*)`", text)]
    for block in re.findall(r"```bash\n(.*?)```", text, re.S) + ["\n".join(inline)]:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #")[0], comments=True)
            if len(words) >= 2 and words[0] == "python" and words[1].endswith(".py"):
                yield words[1][:-3], words[2:]


def test_every_option_of_every_script_has_a_help_line():
    import annotate
    import bench
    import calibrate
    import evaluate
    import export_onnx
    import pre_process
    import release
    import serve

    for module in (pre_process, train, evaluate, demo, bench, export_onnx, release, calibrate, serve, annotate):
        parser = parser_of(module.main)
        assert "usage" in parser.format_help()  # every help expands (a bare % in config.py's comments would not)
        for action in parser._actions:
            if action.dest != "help":
                assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{module.__name__}: {action.option_strings or action.dest}"
    arch = next(a for a in parser_of(train.main)._actions if a.dest == "arch")
    assert set(arch.choices) == {"resnet18", "resnet34", "resnet50", "mobilenet_v2", "sface"}


def test_each_option_is_documented_in_one_place(tmp_path, monkeypatch):
    """Every config dataclass reads (utils._documented_fields), and one documented both above a field and on
    its line, a stray comment glued onto the next option's help, is refused by name."""
    import importlib
    import inspect

    from utils import _documented_fields

    for cls in (c for c in vars(config).values() if inspect.isclass(c) and dataclasses.is_dataclass(c)):
        _documented_fields(cls)
    (tmp_path / "stray_config.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Stray:\n"
        "    age_loss: str = 'dldl'  # ce, or dldl (an age\n    # range gets another loss)\n"
        "    age_weight: float = 1.0  # loss = CE(gender) + age_weight * age loss\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="Stray.age_weight"):
        _documented_fields(importlib.import_module("stray_config").Stray)


def test_every_relative_link_points_at_a_file():
    assert len(DOCS) >= 8
    for page in DOCS:
        text = open(page).read()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            assert os.path.exists(path), f"{os.path.relpath(page, config.ROOT)}: link to {target} points at nothing"


def test_each_readme_command_parses():
    seen = set()
    for script, args in readme_commands():
        if script == "-m":
            continue
        module = __import__(script)
        parser = parser_of(module.main)
        try:
            parser.parse_args(args)
        except SystemExit as e:  # --help exits 0; anything else is a README that lies
            assert e.code == 0 and "--help" in args, f"README: python {script}.py {' '.join(args)}"
        seen.add(script)
    assert {"demo", "pre_process", "train", "evaluate", "calibrate", "bench", "serve"} <= seen


def test_the_readme_reads_in_five_minutes():
    """At most 200 lines and 12,000 characters; one results table with a command for each row, the chart
    beside it, and a speed table of at most six rows."""
    text = open(os.path.join(config.ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 200 and len(text) <= 12_000, (len(text.splitlines()), len(text))
    speed = text[text.index("## Speed"):]
    speed_rows = [line for line in speed[: speed.find("\n\n", speed.index("| ---"))].splitlines() if line.startswith("| `python")]
    assert 1 <= len(speed_rows) <= 6
    assert "docs/gender_by_group.png" in text and os.path.exists(os.path.join(config.ROOT, "docs", "gender_by_group.png"))
