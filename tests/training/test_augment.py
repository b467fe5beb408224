import torch

from training.augment import augment, cutout, flip, translate


def _batch(n=64):
    return torch.arange(n * 3 * 32 * 32, dtype=torch.float32).view(n, 3, 32, 32)


def test_flip_mirrors_about_half_the_images_and_keeps_the_rest():
    x = _batch()
    y = flip(x, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(y[i], x[i].flip(2)) for i in range(len(x))]
    unchanged = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    assert 16 < sum(mirrored) < 48


def test_translate_shifts_each_image_within_the_pad():
    x = _batch(32)
    y = translate(x, 4, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    shifts = set()
    for i in range(len(x)):
        # the 24x24 centre of the output is a shifted window of the input
        found = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(y[i, :, 4:28, 4:28], x[i, :, 4 + dy : 28 + dy, 4 + dx : 28 + dx])
        ]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 5  # per-image, not one shift for the whole batch
    assert torch.equal(translate(x, 0, torch.Generator()), x)


def test_cutout_zeroes_one_square_of_the_given_side_inside_the_image():
    x = torch.ones(200, 3, 32, 32)
    y = cutout(x, 8, torch.Generator().manual_seed(2))
    zeros = (y == 0).all(1)  # all channels at once
    assert torch.equal((y == 0).any(1), zeros)
    counts = zeros.flatten(1).sum(1)
    assert counts.max() == 64 and counts.min() >= 16  # clipped at the edges, never gone
    rows, cols = zeros.any(2), zeros.any(1)
    assert (rows.sum(1) <= 8).all() and (cols.sum(1) <= 8).all()


def test_augment_is_reproducible_from_the_generator():
    x = _batch(16)
    a = augment(x, 4, 8, torch.Generator().manual_seed(3))
    b = augment(x, 4, 8, torch.Generator().manual_seed(3))
    c = augment(x, 4, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
