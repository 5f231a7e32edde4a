"""train.py: losses, training, resume, DDP, distillation, two ages."""
import csv
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import config
import release
import train
from conftest import ROOT
from models import AgeGenderNet, CheckpointError, load_checkpoint

SMALL = ["--arch", "resnet18", "--pretrained", "", "--batch-size", "16", "--workers", "0", "--ckpt-every", "100"]


def run_train(args, capsys=None):
    try:
        code = train.main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err if capsys else ""
    return code, err


def _spans(ages):
    return torch.tensor([[a, a] for a in ages])


def test_gender_loss_ignores_unknown_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-3.0, 4.0]])
    known_only = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 1]))
    assert train.gender_loss(logits, torch.tensor([0, -1, 1])) == pytest.approx(known_only.item())
    assert train.gender_loss(logits, torch.tensor([-1, -1, -1])).item() == 0.0  # no NaN on a batch without gender


@pytest.mark.slow
def test_mixed_run_validates_every_source(utk_cache, clap_cache, tmp_path):
    out = tmp_path / "mix"
    args = ["--cache", utk_cache, clap_cache, "--source-weights", "0.5", "0.5", "--out-dir", str(out), "--arch", "resnet18",
            "--pretrained", "", "--batch-size", "16", "--workers", "0", "--epochs", "1", "--fill-outside", "0.5"]
    assert train.main(args) == 0
    with open(out / "log.csv") as f:
        row = list(csv.DictReader(f))[0]
    assert float(row["val_cache0_age_mae"]) > 0 and float(row["val_cache1_age_mae"]) > 0
    assert 0 <= float(row["val_cache0_gender_acc"]) <= 1 and row["val_cache1_gender_acc"] == "nan"  # CLAP: no gender
    assert 0 <= float(row["val_cache1_age_epsilon"]) <= 1
    # the epoch is chosen by the mean of the sources' MAE
    assert float(row["val_age_mae"]) == pytest.approx((float(row["val_cache0_age_mae"]) + float(row["val_cache1_age_mae"])) / 2, abs=2e-4)
    assert torch.load(out / "best.pt", weights_only=True)["step"] > 0


@pytest.mark.slow
def test_a_few_epochs_lower_the_loss(utk_cache, tmp_path):
    out = tmp_path / "run"
    args = ["--cache", utk_cache, "--out-dir", str(out), "--arch", "mobilenet_v2", "--batch-size", "16", "--workers", "0",
            "--epochs", "3", "--lr", "1e-3", "--warmup-epochs", "0.5"]
    assert train.main(args) == 0
    with open(out / "log.csv") as f:
        log = list(csv.DictReader(f))
    assert len(log) == 3
    assert float(log[-1]["train_loss"]) < 0.85 * float(log[0]["train_loss"])
    for name in ("last.pt", "best.pt", "curves.png"):
        assert os.path.getsize(out / name) > 0
    net, ckpt = load_checkpoint(str(out / "best.pt"))  # weights_only load, on the CPU
    assert ckpt["config"]["arch"] == "mobilenet_v2" and 0 < ckpt["metrics"]["age_mae"] < 100
    # what was validated (the weight average) is what loads, and it is not just the last step's weights
    w = "trunk.features.0.0.weight"
    assert torch.equal(net.state_dict()[w], ckpt["ema"][w]) and not torch.equal(ckpt["ema"][w], ckpt["model"][w])


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(utk_cache, tmp_path):
    # one pass an epoch (9 steps), so that step 12 lies past an epoch's end
    common = ["--cache", utk_cache, "--epochs", "2", "--min-steps", "1"] + SMALL
    assert train.main(common + ["--out-dir", str(tmp_path / "a"), "--max-steps", "12"]) == 0
    assert train.main(common + ["--out-dir", str(tmp_path / "b"), "--max-steps", "5"]) == 0
    assert train.main(common + ["--out-dir", str(tmp_path / "b"), "--max-steps", "12", "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def test_ddp_two_cpu_processes_keep_identical_weights(utk_cache, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
           "--device", "cpu", "--cache", utk_cache, "--out-dir", str(tmp_path), "--epochs", "1", "--max-steps", "3"] + SMALL
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es) on cpu" in res.stdout
    assert "largest weight difference between ranks 0" in res.stdout
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    single = AgeGenderNet("resnet18")
    assert not torch.equal(ckpt["model"]["age_head.weight"], single.state_dict()["age_head.weight"])


def test_bad_input_exits_2_with_one_line(utk_cache, tmp_path, capsys):
    code, err = run_train(["--cache", str(tmp_path / "none"), "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "no cache here" in err
    code, err = run_train(["--cache", utk_cache, "--arch", "vgg99", "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "invalid choice: 'vgg99'" in err
    code, err = run_train(["--cache", utk_cache, "--aug-scale", "1.2", "0.9", "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "--aug-scale takes LO HI" in err and len(err.strip().splitlines()) == 1
    code, err = run_train(["--cache", utk_cache, "--balance", "1.5", "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "--balance must be between 0 and 1" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    for arch in ("sface", "mobilenet_v2"):
        code, err = run_train(["--cache", utk_cache, "--arch", arch, "--pretrained", str(tmp_path / "bad.onnx"), "--out-dir", str(tmp_path / "o")], capsys)
        assert code == 2 and "bad.onnx" in err and len(err.strip().splitlines()) == 1, err
    code, err = run_train(["--cache", utk_cache, "--arch", "mobilenet_v2", "--freeze-stages", "20", "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "the mobilenet_v2 trunk has 19 stages" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "r"
    os.makedirs(out)
    (out / "last.pt").write_bytes(b"garbage" * 100)
    code, err = run_train(["--cache", utk_cache, "--out-dir", str(out), "--resume"] + SMALL, capsys)
    assert code == 2 and "not a usable checkpoint" in err and len(err.strip().splitlines()) == 1
    torch.save({"weights": torch.zeros(3)}, out / "last.pt")
    code, err = run_train(["--cache", utk_cache, "--out-dir", str(out), "--resume"] + SMALL, capsys)
    assert code == 2 and "not a usable checkpoint" in err
    for bad in ("last.pt",):
        with pytest.raises(CheckpointError):
            load_checkpoint(str(out / bad))


def test_resume_of_a_finished_run_changes_nothing(utk_cache, tmp_path, capsys):
    args = ["--cache", utk_cache, "--out-dir", str(tmp_path), "--max-steps", "4"] + SMALL + ["--epochs", "2"]
    assert train.main(args) == 0
    before = torch.load(tmp_path / "last.pt", weights_only=True)
    assert train.main(args + ["--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    after = torch.load(tmp_path / "last.pt", weights_only=True)
    assert after["step"] == before["step"] == 4
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_resume_without_a_checkpoint_starts_fresh(utk_cache, tmp_path, capsys):
    args = ["--cache", utk_cache, "--out-dir", str(tmp_path / "new"), "--max-steps", "2", "--resume"] + SMALL + ["--epochs", "2"]
    assert train.main(args) == 0
    assert "starts a fresh run" in capsys.readouterr().out
    assert torch.load(tmp_path / "new" / "last.pt", weights_only=True)["step"] == 2


def test_resume_with_another_config_is_refused(utk_cache, tmp_path, capsys):
    base = ["--cache", utk_cache, "--out-dir", str(tmp_path), "--epochs", "1", "--max-steps", "2"] + SMALL
    assert run_train(base, capsys)[0] == 0
    code, err = run_train(base + ["--resume", "--lr", "0.5"], capsys)
    assert code == 2 and "lr=0.001" in err


def test_resuming_a_finished_run_reads_no_data(utk_cache, tmp_path, capsys, monkeypatch):
    # a recipe's finished stage costs a start-up, not a pass over the caches and teachers
    base = ["--cache", utk_cache, "--out-dir", str(tmp_path), "--epochs", "1", "--max-steps", "2"] + SMALL
    assert run_train(base, capsys)[0] == 0

    def no_data(*a, **k):
        raise AssertionError("build_data called for a finished run")

    monkeypatch.setattr(train, "build_data", no_data)
    assert train.main(base + ["--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="build_data"):  # a run with steps left does read its data
        train.main(base[:-len(SMALL)] + ["--max-steps", "3"] + SMALL + ["--resume"])


def test_nan_loss_stops_training_without_saving(utk_cache, tmp_path, capsys):
    code, err = run_train(["--cache", utk_cache, "--out-dir", str(tmp_path), "--age-weight", "nan", "--max-steps", "3"] + SMALL, capsys)
    assert code == 3 and "loss became nan" in err
    assert not os.path.exists(tmp_path / "last.pt")


def test_frozen_stages_keep_their_weights_and_statistics(utk_cache, tmp_path):
    out = tmp_path / "frozen"
    args = ["--cache", utk_cache, "--out-dir", str(out), "--arch", "mobilenet_v2", "--pretrained", "", "--freeze-stages", "12",
            "--batch-size", "16", "--workers", "0", "--epochs", "1", "--max-steps", "4", "--lr", "1e-2", "--ema-decay", "0", "--no-eval-tta"]
    assert train.main(args) == 0
    from demo import views_of
    assert views_of(torch.load(out / "last.pt", weights_only=True)) == (False, config.TTA_ZOOM)  # validated with one view, predicts with one
    torch.manual_seed(0)  # train.py seeds with --seed 0 before it builds the network
    init = AgeGenderNet("mobilenet_v2", pretrained="", two_ages=True).state_dict()
    trained = torch.load(out / "last.pt", weights_only=True)["model"]
    assert set(trained) == set(init)  # a frozen run's checkpoint loads like any other
    frozen = [k for k in init if k.startswith("trunk.features.") and int(k.split(".")[2]) < 12]
    assert frozen and all(torch.equal(trained[k], init[k]) for k in frozen)  # weights and BatchNorm statistics
    assert not torch.equal(trained["trunk.features.12.conv.0.1.running_mean"], init["trunk.features.12.conv.0.1.running_mean"])
    assert not torch.equal(trained["trunk.features.12.conv.0.0.weight"], init["trunk.features.12.conv.0.0.weight"])


def test_distill_loss_is_zero_at_the_teachers_distribution():
    cfg = config.TrainConfig(age_weight=0.5)
    g_logits, a_logits = torch.tensor([[0.3, -1.0], [2.0, 0.0]]), torch.randn(2, config.NUM_AGES)
    same = train.distill_loss((g_logits, a_logits), (g_logits.softmax(1), a_logits.softmax(1)), cfg)
    assert abs(same.item()) < 1e-6
    # by hand: gender KL of [0.5, 0.5] from softmax([0, log 3]) = [0.25, 0.75] is 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75)
    g = torch.tensor([[0.0, float(np.log(3))]])
    uniform_age = torch.full((1, config.NUM_AGES), 1 / config.NUM_AGES)
    got = train.distill_loss((g, torch.zeros(1, config.NUM_AGES)), (torch.tensor([[0.5, 0.5]]), uniform_age), cfg)
    assert got.item() == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3), abs=1e-6)
    # a one-age teacher teaches a two-age network both of its ages the one it has
    two = train.distill_loss((g, torch.zeros(1, config.NUM_AGES), torch.zeros(1, config.NUM_AGES)), (torch.tensor([[0.5, 0.5]]), uniform_age), cfg)
    assert two.item() == pytest.approx(got.item(), abs=1e-6)


def test_joint_loss_distils_only_the_faces_given_a_share():
    cfg = config.TrainConfig(age_weight=0.5, age_loss="dldl")
    torch.manual_seed(0)
    g, a = torch.randn(4, 2), torch.randn(4, config.NUM_AGES)
    span, gender = _spans([3, 30, 60, 90]), torch.tensor([0, 1, -1, 1])
    soft = torch.randn(4, 2).softmax(1), torch.randn(4, config.NUM_AGES).softmax(1)
    labels = train.joint_loss((g, a), span, gender, cfg)
    kd = train.distill_loss((g, a), soft, cfg)
    # the same share everywhere: (1 - w) * the labels' loss + w * the distillation term, as before shares
    uniform = train.joint_loss((g, a), span, gender, cfg, soft=soft, share=torch.full((4,), 0.3))
    assert uniform.item() == pytest.approx((0.7 * labels + 0.3 * kd).item(), rel=1e-5)
    # share 0 on the last two faces: what the teachers say of them does not count
    share = torch.tensor([0.5, 0.5, 0.0, 0.0])
    other = soft[0].clone(), soft[1].clone()
    other[0][2:], other[1][2:] = other[0][2:].flip(1), other[1][2:].roll(40, 1)
    got = train.joint_loss((g, a), span, gender, cfg, soft=soft, share=share)
    assert got.item() == pytest.approx(train.joint_loss((g, a), span, gender, cfg, soft=other, share=share).item(), rel=1e-6)
    assert got.item() != pytest.approx(train.joint_loss((g, a), span, gender, cfg, soft=other, share=torch.full((4,), 0.5)).item(), rel=1e-3)


def test_an_age_range_loss_rewards_mass_inside_the_range():
    """FairFace's labels are age groups: -log P(age in range), checked by hand, not the group's middle age."""
    ages = torch.arange(config.NUM_AGES)
    span = torch.tensor([[20, 29]])
    inside = torch.where((ages >= 20) & (ages <= 29), 0.0, -30.0)[None]  # all the mass on 20-29, spread evenly
    at_edge = torch.where(ages == 29, 0.0, -30.0)[None]  # all of it on 29: still inside, as good
    outside = torch.where((ages >= 40) & (ages <= 49), 0.0, -30.0)[None]
    half = torch.where((ages >= 25) & (ages <= 34), 0.0, -30.0)[None]  # half inside: -log 0.5
    loss = {name: train.range_loss(logits, span).item() for name, logits in
            (("inside", inside), ("edge", at_edge), ("outside", outside), ("half", half))}
    assert loss["inside"] == pytest.approx(0, abs=1e-6) and loss["edge"] == pytest.approx(0, abs=1e-6)
    assert loss["half"] == pytest.approx(np.log(2), abs=1e-5)
    assert loss["outside"] > 25
    # in age_loss a range gets the range loss and an exact age (min = max) the Gaussian one
    cfg = config.TrainConfig(age_loss="dldl")
    both = train.age_loss(torch.cat([inside, inside]), torch.tensor([[20, 29], [25, 25]]), cfg, reduce=False)
    assert both[0].item() == pytest.approx(0, abs=1e-6) and both[1].item() > 0.5


def test_each_label_trains_the_age_of_its_kind():
    """With two age outputs a face of an apparent-age source moves only the apparent age, a real one only the age."""
    cfg = config.TrainConfig()
    torch.manual_seed(0)
    g = torch.randn(2, 2)
    real, apparent = torch.randn(2, config.NUM_AGES, requires_grad=True), torch.randn(2, config.NUM_AGES, requires_grad=True)
    loss = train.joint_loss((g, real, apparent), _spans([30, 40]), torch.tensor([0, 1]), cfg, apparent=torch.tensor([False, True]))
    loss.backward()
    assert real.grad[0].abs().sum() > 0 and real.grad[1].abs().sum() == 0
    assert apparent.grad[1].abs().sum() > 0 and apparent.grad[0].abs().sum() == 0


def test_distill_shares_per_source():
    caches = ("data/utkface", "data/clap2016", "data/aaf")
    one = config.TrainConfig(cache=caches, teacher=("t.pt",), distill_weight=(0.5,))
    assert train.distill_shares(one).tolist() == [0.5, 0.5, 0.5]
    each = dataclasses.replace(one, distill_weight=(0.8, 1.0, 0.25))
    assert train.distill_shares(each).tolist() == pytest.approx([0.8, 1.0, 0.25])
    # a source --teacher-sources leaves out gets no share, whatever its weight
    some = dataclasses.replace(each, teacher_sources=("data/clap2016", "data/aaf"))
    assert train.distill_shares(some).tolist() == pytest.approx([0.0, 1.0, 0.25])


@pytest.mark.slow
def test_distillation_learns_from_the_teachers_not_the_labels(utk_cache, tmp_path, capsys):
    import shutil

    teacher = tmp_path / "teacher"
    assert train.main(["--cache", utk_cache, "--out-dir", str(teacher), "--epochs", "1", "--max-steps", "3"] + SMALL) == 0
    # the same faces with every training face's age and gender given to another face
    shuffled = tmp_path / "shuffled"
    shutil.copytree(utk_cache, shuffled)
    with open(shuffled / "meta.csv") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["split"] == "train"]
    labels = [(r["age"], r["gender"]) for r in train_rows]
    for r, (age, gender) in zip(train_rows, labels[1:] + labels[:1]):
        r["age"], r["gender"] = age, gender
    with open(shuffled / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def student(cache, weight, name, extra=()):
        args = ["--cache", str(cache), "--out-dir", str(tmp_path / name), "--epochs", "1", "--max-steps", "3",
                "--teacher", str(teacher / "last.pt"), str(teacher / "last.pt"), "--teacher-weights", "1", "3",
                "--distill-weight", weight, *extra] + SMALL
        assert train.main(args) == 0
        ckpt = torch.load(tmp_path / name / "last.pt", weights_only=True)
        assert 0 < ckpt["teacher_metrics"]["age_mae"] < 100  # the teachers were validated too
        return ckpt["model"]

    a, b = student(utk_cache, "1", "a"), student(shuffled, "1", "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # all of the loss follows the teachers: the labels play no part
    c, d = student(utk_cache, "0.5", "c"), student(shuffled, "0.5", "d")
    assert not all(torch.equal(c[k], d[k]) for k in c)
    # --teacher-view clean: the same batches for the network, the teachers reading them undamaged
    e = student(utk_cache, "1", "e", ["--teacher-view", "clean"])
    assert not all(torch.equal(a[k], e[k]) for k in a)

    # each teacher predicts with its own views (this run validated with four), or one each (--no-teacher-tta)
    net, _ = load_checkpoint(str(teacher / "last.pt"))
    x = torch.randn(3, 3, config.IMAGE_H, config.IMAGE_W)
    for own_views in (True, False):
        gender, age, _ = train.Teachers([str(teacher / "last.pt")] * 2, [1, 3], "cpu", own_views)(x)
        with torch.no_grad():
            want_gender, want_age, _ = net.probabilities(x, own_views)
        assert torch.allclose(gender, want_gender, atol=1e-5) and torch.allclose(age, want_age, atol=1e-5)
    assert not torch.allclose(net.probabilities(x, True)[1], net.probabilities(x, False)[1], atol=1e-5)

    capsys.readouterr()  # the progress bars of the runs above
    base = ["--cache", utk_cache, "--out-dir", str(tmp_path / "o"), "--max-steps", "1"] + SMALL
    for extra, msg in ((["--teacher", str(tmp_path / "none.pt")], "none.pt: checkpoint not found"),
                       (["--teacher", str(teacher / "last.pt"), "--teacher-weights", "1", "2"], "--teacher-weights has 2 value(s) for 1"),
                       (["--teacher", str(teacher / "last.pt"), "--distill-weight", "2"], "--distill-weight must be between 0 and 1"),
                       (["--teacher", str(teacher / "last.pt"), "--distill-weight", "0.5", "0.5"], "--distill-weight has 2 values for 1 --cache"),
                       (["--teacher", str(teacher / "last.pt"), "--teacher-sources", "data/nowhere"], "data/nowhere is not one of --cache"),
                       (["--teacher-sources", utk_cache], "--teacher-sources needs --teacher"),
                       (["--teacher-view", "clean"], "--teacher-view clean needs --teacher"),
                       (["--hard-harsh", "2"], "are shares between 0 and 1"),
                       (["--neighbour-aug", "-0.1"], "--neighbour-aug, --sharpen-aug are shares between 0 and 1, got 0.3, 0.2, 0.0, -0.1"),
                       (["--sharpen-aug", "1.5"], "--sharpen-aug are shares between 0 and 1")):
        code, err = run_train(base + extra, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    code, err = run_train(base + ["--teacher", str(teacher / "last.pt"), "--teacher-view", "sideways"], capsys)
    assert code == 2 and "--teacher-view: invalid choice: 'sideways'" in err


def test_cpu_without_native_bf16_trains_in_fp32(monkeypatch, capsys):
    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: False)
    assert train.autocast_dtype(cpu, verbose=True) is None  # emulated bf16 made a step 60x slower on an AVX2 CPU
    assert "no native bf16" in capsys.readouterr().out
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)
    assert train.autocast_dtype(cpu) is torch.bfloat16


def test_a_two_age_run_validates_each_source_on_its_own_age(two_age_checkpoint, utk_cache, range_cache):
    net, ckpt = load_checkpoint(two_age_checkpoint)
    assert net.two_ages and ckpt["config"]["two_ages"]
    row = ckpt["history"][-1]
    assert 0 <= row["val_fairface_like_age_group_acc"] <= 1 and row["val_cache_age_mae"] > 0
    assert "val_cache_age_group_acc" not in row  # exact real ages: an MAE, no group to be inside
    out = net.predict(torch.zeros(2, 3, config.IMAGE_H, config.IMAGE_W))
    assert out["apparent_age_prob"].shape == (2, config.NUM_AGES) and out["apparent_age"].shape == (2,)


def test_a_two_age_network_starts_from_a_one_age_checkpoint_with_both_heads_its_age_head(tmp_path, one_age_release):
    net = AgeGenderNet("sface", pretrained=one_age_release, two_ages=True).eval()
    x = torch.randn(3, 3, config.IMAGE_H, config.IMAGE_W, generator=torch.Generator().manual_seed(0))
    out = net.predict(x)
    assert torch.equal(out["age_prob"], out["apparent_age_prob"])
    # a soup of a one-age and a two-age checkpoint: the one-age side lends its age head to both
    two = tmp_path / "two.pt"
    torch.save({"model": net.state_dict(), "config": {"arch": "sface"}}, two)
    soup = release.average_checkpoints([one_age_release, str(two)])
    assert "apparent_head.weight" in soup["model"]


def test_a_small_set_trains_at_least_min_steps(tmp_path, utk_cache, capsys):
    """139 faces in batches of 128 for 2 epochs would be 4 steps: each epoch passes over them 9 times (20 steps
    in all, at least --min-steps 20), and the log line says so; a set large enough for it is passed over once."""
    args = ["--cache", utk_cache, "--arch", "resnet18", "--pretrained", "", "--workers", "0", "--epochs", "2", "--max-steps", "1"]
    assert train.main(args + ["--out-dir", str(tmp_path / "a"), "--batch-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "2 epochs of 10 steps of 128 (each epoch passes over the 139 faces 9 times" in out
    assert train.main(args + ["--out-dir", str(tmp_path / "b"), "--batch-size", "8"]) == 0
    assert "2 epochs of 18 steps of 8, lr" in capsys.readouterr().out
