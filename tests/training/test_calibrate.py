"""python -m training.calibrate on a checkpoint, the OOD report's measures, the deletion check's
pixel deletion, and the sets of pictures that are not CIFAR-10."""

from __future__ import annotations

import torch

from app.calibration import Calibration
from app.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from app.model import MEAN, FinalModel
from app.service import load_model
from training.calibrate import main as calibrate_main
from training.ood_report import auroc, fpr95
from training.ood_sets import ood_sets
from training.trust import delete_pixels


def test_calibrating_a_checkpoint_records_what_the_service_then_applies(tiny_data, tmp_path):
    path, out = tmp_path / "model.pt", tmp_path / "calibrated.pt"
    torch.manual_seed(0)
    save_checkpoint(path, FinalModel(), config={"val_size": 20, "seed": 0}, metrics={"test_acc": 0.1})
    before = file_sha256(path)
    args = ["--weights", str(path), "--data", str(tiny_data), "--cache-dir", str(tmp_path / "c")]
    assert calibrate_main([*args, "--out", str(out)]) == 0
    assert file_sha256(path) == before  # --out leaves the original alone
    meta = load_checkpoint(out).meta
    calibration = Calibration.from_meta(meta)
    assert calibration.temperature > 0 and calibration.detector is not None
    # fitted on the checkpoint's own validation split (its val_size), never on the test split
    assert meta["calibration"]["fitted_on"] == "validation split (20 held-out training images)"
    assert meta["ood"]["fitted_on"].endswith("the 20 validation images")
    served = load_model(out, torch.device("cpu"))
    assert served.calibration.temperature == calibration.temperature
    assert torch.equal(
        load_checkpoint(out).state_dict["fc.weight"], load_checkpoint(path).state_dict["fc.weight"]
    )
    assert calibrate_main(args) == 0 and file_sha256(path) != before  # without --out: in place


def test_a_bare_state_dict_cannot_be_calibrated(tmp_path, tiny_data, capsys):
    path = tmp_path / "bare.pt"
    torch.save(FinalModel().state_dict(), path)
    assert (
        calibrate_main(["--weights", str(path), "--data", str(tiny_data), "--cache-dir", str(tmp_path)]) == 2
    )
    assert "bare state_dict" in capsys.readouterr().err


def test_auroc_and_fpr95_on_scores_with_known_answers():
    inside = torch.arange(100.0)
    assert auroc(inside, inside + 1000) == 1.0 and fpr95(inside, inside + 1000) == 0.0
    assert auroc(inside, inside - 1000) == 0.0 and fpr95(inside, inside - 1000) == 1.0
    assert abs(auroc(inside, inside.clone()) - 0.5) < 1e-9  # ties count half
    assert fpr95(inside, torch.full((10,), 50.0)) == 1.0  # all under the 95th percentile


def test_deleting_pixels_blanks_exactly_the_quarter_ranked_highest_or_lowest():
    images = torch.full((2, 3, 32, 32), 7, dtype=torch.uint8)
    ranking = torch.arange(1024.0).view(1, 32, 32).repeat(2, 1, 1)
    mean = (torch.tensor(MEAN) * 255).round().to(torch.uint8)
    top, bottom = delete_pixels(images, ranking, top=True), delete_pixels(images, ranking, top=False)
    assert (top[:, :, 24:] == mean.view(1, 3, 1, 1)).all() and (top[:, :, :24] == 7).all()
    assert (bottom[:, :, :8] == mean.view(1, 3, 1, 1)).all() and (bottom[:, :, 8:] == 7).all()


def test_every_set_of_strange_pictures_is_made_here_in_the_service_format():
    test_images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    sets = ood_sets(test_images, n=12)
    assert set(sets) == {"uniform noise", "smooth noise", "textures", "photos (no CIFAR-10 class)", "digits",
                         "text", "scrambled CIFAR-10 test"}  # fmt: skip
    for name, images in sets.items():
        assert images.dtype == torch.uint8 and images.shape == (12, 3, 32, 32), name
        assert images.float().std() > 5, name  # real content, not a blank
    # scrambling keeps each image's colours and moves its pixels
    assert torch.equal(
        sets["scrambled CIFAR-10 test"].flatten(2).sort(2).values, test_images[:12].flatten(2).sort(2).values
    )


def test_the_heatmap_check_asks_the_top_quarter_to_cost_twice_the_bottom_and_more():
    from argparse import Namespace

    from training.evaluate import trust_failure

    def failure(top: float, bottom: float) -> str | None:
        report = {"ece_after": 0.01, "deletion": {"drop_top": top, "drop_bottom": bottom}}
        return trust_failure(Namespace(max_ece=0.02), report)

    assert failure(0.195, -0.001) is None  # FinalModel
    assert failure(0.131, 0.037) is None  # airbench96's shape, trained with cutout
    assert "0.120" in failure(0.12, 0.07)  # ratio under 2
    assert failure(0.04, 0.0) is not None  # under the margin
    assert failure(0.05, 0.06) is not None
    assert "ECE" in trust_failure(Namespace(max_ece=0.02), {"ece_after": 0.021})
