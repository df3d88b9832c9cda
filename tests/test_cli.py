"""The command line end to end, as a user (or a script) runs it: real subprocesses on tiny data."""

import json
import subprocess
import sys

import pytest

from miniresnet.cli import build_parser, config_from_args
from miniresnet.config import PRESETS


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "miniresnet", *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def test_train_then_evaluate(tiny_data, tmp_path):
    out = tmp_path / "run"
    train = run(
        "train",
        "--preset",
        "seed",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--data-dir",
        str(tiny_data),
        "--out",
        str(out),
        "--quiet",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--no-verify-data",
        "--lr",
        "0.003",
    )
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    assert 0 <= summary["test_acc"] <= 1 and summary["epochs"] == 2 and summary["seconds"] > 0
    assert (out / "config.json").exists() and (out / "last.pt").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert json.loads((out / "config.json").read_text())["seed"] == 3

    evaluate = run("evaluate", str(out / "last.pt"), "--data-dir", str(tiny_data), "--json", "--no-verify-data")
    result = json.loads(evaluate.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == pytest.approx(summary["test_acc"])
    assert len(result["per_class"]) == 10 and sum(map(sum, result["confusion"])) == 100

    table = run("evaluate", str(out / "last.pt"), "--data-dir", str(tiny_data), "--no-verify-data")
    assert "confusion matrix" in table.stdout and "airplane" in table.stdout


def test_cli_options_map_onto_the_config():
    args = build_parser().parse_args(
        [
            "train",
            "--epochs",
            "3",
            "--no-flip",
            "--widths",
            "8",
            "16",
            "32",
            "--out",
            "somewhere",
            "--val-split",
            "5000",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.flip, cfg.widths, cfg.out_dir, cfg.val_split) == (3, False, (8, 16, 32), "somewhere", 5000)
    assert cfg.lr == PRESETS["seed"].lr  # untouched options keep the preset's values


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["download"]])
def test_help(command):
    result = run(*command, "--help")
    assert "usage: miniresnet" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--preset", "nope"], "invalid choice: 'nope'"),
        (["train", "--epochs", "many"], "invalid int value"),
        (["train", "--epochs", "-2", "--data-dir", "x"], "epochs must be at least 1"),
        (["train", "--data-dir", "/nonexistent", "--no-download", "--out", "{tmp}/r"], "no CIFAR-10 data in /no"),
        (["evaluate", "{tmp}/missing.pt", "--data-dir", "x"], "missing.pt does not exist"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(tmp_path, args, message):
    result = run(*[a.replace("{tmp}", str(tmp_path)) for a in args], check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "seed", "x.png", "--threads", "-1"], "must be 0 (the cores) or more, got -1"),
        (["evaluate", "seed", "--threads", "-2"], "must be 0 (the cores) or more, got -2"),
        (["serve", "--max-upload-mb", "nan"], "must be a number above 0, got nan"),
        (["serve", "--max-upload-mb", "0"], "must be a number above 0, got 0"),
        (["serve", "--body-timeout-s", "-1"], "must be a number above 0, got -1"),
        (["serve", "--max-wait-ms", "inf"], "must be a number, 0 or above, got inf"),
        (["serve", "--decode-workers", "-1"], "must be 0 (the cores) or more, got -1"),
        (["serve", "--port", "70000"], "a port is between 0 and 65535, got 70000"),
    ],
)
def test_a_number_out_of_range_is_a_usage_error_naming_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {args[-2]}: {message}" in err
