"""MRC maps and stacks: real RELION files, round trips, bad input, parity with relion_image_handler."""

from __future__ import annotations

import math
import os
import re
import subprocess

import mrcfile
import numpy as np
import pytest

from cryodask.errors import UserError
from cryodask.io.mrc import (
    StackInfo,
    parse_image_name,
    read_images,
    read_map,
    read_stack,
    stack_info,
    voxel_size_of,
    write_map,
    write_stack,
)

# --- real files from ../shared/data ---------------------------------------------------


def test_relion31_stack_reads_with_relions_statistics(shared_data):
    # relion31.mrcs has a RELION-style header (no MAP id, no machine stamp, nversion 0).
    path = shared_data / "star/cryodrgn/relion31.mrcs"
    info = stack_info(path)
    assert (info.n, info.ny, info.nx, info.mode) == (5, 256, 256, 2)
    assert info.offset == 1024
    stack = read_stack(path)
    assert stack.shape == (5, 256, 256)
    # Values printed by `relion_image_handler --stats --i relion31.mrcs` (RELION 3.1.3).
    img = np.asarray(stack[0], dtype=np.float64)
    assert img.mean() == pytest.approx(-0.0177178, abs=5e-7)
    assert img.std() == pytest.approx(0.993506, abs=5e-6)
    assert img.min() == pytest.approx(-4.3316, abs=5e-5)
    assert img.max() == pytest.approx(3.89347, abs=5e-5)
    assert float(stack[3].mean()) == pytest.approx(0.0775736, abs=5e-7)


def test_real_stacks_shapes_and_voxel_sizes(shared_data):
    star = shared_data / "star"
    cases = {
        "aspire/sample.mrcs": ((17, 200, 200), math.nan),
        "aspire/rln_proj_64.mrcs": ((5, 64, 64), math.nan),
        "aspire/rln_proj_64_shifted.mrcs": ((4, 64, 64), 1.0),
        "cryodrgn/toy_datadir/toy_images_b.mrcs": ((900, 30, 30), 1.0),
        "cryojax/trpv1_small_stack.mrcs": ((10, 48, 48), 4.88),
        # X cell size not set: RELION reports angpix = 1 (cella.x / mx); Y and Z say 12.
        "cryojax/000000.mrcs": ((3, 16, 16), 1.0),
    }
    for rel, (shape, voxel) in cases.items():
        info = stack_info(star / rel)
        assert info.shape == shape, rel
        if math.isnan(voxel):
            assert math.isnan(info.voxel_size), rel
        else:
            assert info.voxel_size == voxel, rel  # float32 header noise rounded off (4.88, not 4.8800001)
    assert stack_info(star / "cryojax/000000.mrcs").voxel_size_xyz == (1.0, 12.0, 12.0)


def test_real_maps(shared_data):
    hand, v = read_map(shared_data / "maps/cryodrgn_hand-vol.mrc")
    assert hand.shape == (64, 64, 64) and hand.dtype == np.float32 and v == 1.0
    spike, v = read_map(shared_data / "maps/cryodrgn_spike-vol.mrc")
    assert spike.shape == (128, 16, 16) and v == 8.0
    trpv1, v = read_map(shared_data / "maps/cryojax_trpv1_volume.mrc")
    assert trpv1.shape == (48, 48, 48) and v == 4.88
    # RELION 3.1.3 --stats on this map: avg= 0.00777223 stddev= 0.0542097 maxval= 0.818375
    assert float(trpv1.mean(dtype=np.float64)) == pytest.approx(0.00777223, abs=5e-9)
    assert float(trpv1.std(dtype=np.float64)) == pytest.approx(0.0542097, abs=5e-8)
    assert float(trpv1.max()) == pytest.approx(0.818375, abs=5e-7)
    assert voxel_size_of(shared_data / "maps/cryojax_trpv1_volume.mrc") == 4.88


def test_read_images_real_stacks(shared_data):
    folder = shared_data / "star/cryodrgn"
    names = ["000003@relion31.mrcs", "000001@relion31.mrcs", "000003@relion31.mrcs"]
    imgs = read_images(names, base_dir=folder)
    full = read_stack(folder / "relion31.mrcs")
    assert imgs.shape == (3, 256, 256) and imgs.dtype == np.float32
    np.testing.assert_array_equal(imgs[0], full[2])
    np.testing.assert_array_equal(imgs[1], full[0])
    np.testing.assert_array_equal(imgs[2], full[2])


def test_read_images_base_dir_list_and_several_stacks(shared_data, tmp_path):
    # relion5.star names N@toy_images_a.mrcs / N@toy_images_b.mrcs, kept in toy_datadir/.
    toy = shared_data / "star/cryodrgn/toy_datadir"
    names = ["11@toy_images_b.mrcs", "1@toy_images_a.mrcs", "900@toy_images_b.mrcs"]
    imgs = read_images(names, base_dir=[tmp_path, toy])  # first folder lacks them: second is used
    assert imgs.shape == (3, 30, 30)
    np.testing.assert_array_equal(imgs[0], read_stack(toy / "toy_images_b.mrcs")[10])
    np.testing.assert_array_equal(imgs[1], read_stack(toy / "toy_images_a.mrcs")[0])
    np.testing.assert_array_equal(imgs[2], read_stack(toy / "toy_images_b.mrcs")[899])


def test_odd_box_real_stack_refused_unless_allowed(shared_data):
    folder = shared_data / "star/aspire"
    names = [f"{i}@rln_proj_65.mrcs" for i in range(1, 6)]
    with pytest.raises(UserError) as e:
        read_images(names, base_dir=folder, source="rln_proj_65.star")
    assert e.value.where == "rln_proj_65.star, row 1, rlnImageName"
    assert "odd box of 65" in e.value.what and "--new_box 64" in e.value.what
    imgs = read_images(names, base_dir=folder, allow_odd=True)
    assert imgs.shape == (5, 65, 65)
    np.testing.assert_array_equal(imgs[4], read_stack(folder / "rln_proj_65.mrcs")[4])


# --- round trips, memmaps ----------------------------------------------------------------


def test_map_round_trip_and_header(tmp_path, rng):
    data = rng.normal(size=(6, 10, 12)).astype(np.float32)
    path = tmp_path / "map.mrc"
    write_map(path, data, 1.25)
    back, voxel = read_map(path)
    np.testing.assert_array_equal(back, data)
    assert voxel == 1.25
    assert mrcfile.validate(str(path), print_file=open(os.devnull, "w"))  # strict MRC2014
    with mrcfile.open(path, header_only=True) as m:
        assert int(m.header.mode) == 2 and int(m.header.ispg) == 1
        assert float(m.header.dmax) == pytest.approx(float(data.max()))
    assert [p.name for p in tmp_path.iterdir()] == ["map.mrc"]  # no temporary left behind


def test_map_voxel_nan_is_unset(tmp_path):
    path = tmp_path / "m.mrc"
    write_map(path, np.zeros((4, 4, 4), np.float32), math.nan)
    with mrcfile.open(path, header_only=True) as m:
        assert float(m.voxel_size.x) == 0.0
    assert math.isnan(read_map(path)[1])
    with pytest.raises(UserError) as e:
        write_map(path, np.zeros((4, 4, 4), np.float32), -2.0)
    assert e.value.where == str(path)


def test_stack_round_trip_memmap(tmp_path, rng):
    images = rng.normal(size=(4, 8, 8)).astype(np.float64)  # converted to float32 on write
    path = tmp_path / "s.mrcs"
    write_stack(path, images, 3.5)
    with mrcfile.open(path, header_only=True) as m:
        assert int(m.header.ispg) == 0 and int(m.header.mode) == 2
    mm = read_stack(path)
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    assert mm.shape == (4, 8, 8)
    np.testing.assert_array_equal(mm, images.astype(np.float32))
    inmem = read_stack(path, mmap=False)
    assert not isinstance(inmem, np.memmap)
    np.testing.assert_array_equal(inmem, mm)
    m2, v = read_map(path, mmap=True)
    assert isinstance(m2, np.memmap) and v == 3.5


def test_single_image_reads_as_stack_of_one(tmp_path, rng):
    img = rng.normal(size=(8, 8)).astype(np.float32)
    write_stack(tmp_path / "one.mrcs", img, 1.0)
    assert read_stack(tmp_path / "one.mrcs").shape == (1, 8, 8)
    with mrcfile.new(tmp_path / "plain.mrc") as m:  # a genuinely 2-D MRC
        m.set_data(img)
    assert read_stack(tmp_path / "plain.mrc").shape == (1, 8, 8)
    # A bare name (no N@) reads the file's only image.
    got = read_images(["plain.mrc", "1@one.mrcs"], base_dir=tmp_path)
    np.testing.assert_array_equal(got[0], img)
    np.testing.assert_array_equal(got[1], img)


@pytest.mark.parametrize("dtype,mode", [(np.int8, 0), (np.int16, 1), (np.uint16, 6), (np.float16, 12), (">f4", 2)])
def test_other_modes_and_byte_order(tmp_path, dtype, mode):
    data = (np.arange(2 * 4 * 4) % 50).astype(dtype).reshape(2, 4, 4)
    with mrcfile.new(tmp_path / "x.mrcs") as m:
        m.set_data(data)
        m.set_image_stack()
    assert stack_info(tmp_path / "x.mrcs").mode == mode
    got = read_images(["2@x.mrcs"], base_dir=tmp_path)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[0], data[1].astype(np.float32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile's, when this test edits the header
def test_relion_style_header_quirks_accepted(tmp_path, rng):
    # RELION writes no MAP id, machine stamp 0, nversion 0, cell 0 and mz = nz.
    data = rng.normal(size=(3, 8, 8)).astype(np.float32)
    path = tmp_path / "r.mrcs"
    write_stack(path, data, 2.0)
    with mrcfile.open(path, "r+") as m:
        m.header.map = b"\0\0\0\0"
        m.header.machst = [0, 0, 0, 0]
        m.header.nversion = 0
        m.header.mz = 3
        m.header.cella = (0, 0, 0)
    assert not mrcfile.validate(str(path), print_file=open(os.devnull, "w"))
    info = stack_info(path)
    assert info.shape == (3, 8, 8) and math.isnan(info.voxel_size)
    np.testing.assert_array_equal(read_images(["3@r.mrcs"], base_dir=tmp_path)[0], data[2])


def test_stackinfo_is_a_dataclass(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 6, 6), np.float32), 1.0)
    info = stack_info(tmp_path / "s.mrcs")
    assert isinstance(info, StackInfo)
    assert info.nbytes == 2 * 6 * 6 * 4 and info.dtype == np.dtype("<f4")


# --- image names -------------------------------------------------------------------------


def test_parse_image_name():
    assert parse_image_name("000012@Particles/stack.mrcs") == (11, "Particles/stack.mrcs")
    assert parse_image_name("1@/abs/s.mrcs") == (0, "/abs/s.mrcs")
    assert parse_image_name("  0000001@000000.mrcs ") == (0, "000000.mrcs")
    assert parse_image_name("3@stack.mrcs:mrcs") == (2, "stack.mrcs")
    assert parse_image_name("single.mrc") == (0, "single.mrc")
    for bad, text in [("0@s.mrcs", "numbers images from 1"), ("-2@s.mrcs", "numbers images from 1"),
                      ("x@s.mrcs", "image number"), ("@s.mrcs", "image number"), ("5@", "no file name")]:
        with pytest.raises(UserError) as e:
            parse_image_name(bad, location="p.star, row 4, rlnImageName")
        assert e.value.where == "p.star, row 4, rlnImageName"
        assert text in e.value.what, bad


# --- bad input -----------------------------------------------------------------------


@pytest.fixture
def stack3(tmp_path, rng):
    data = rng.normal(size=(3, 8, 8)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", data, 1.0)
    return tmp_path, data


def test_missing_stack(stack3):
    folder, _ = stack3
    with pytest.raises(UserError) as e:
        read_images(["1@s.mrcs", "2@gone.mrcs"], base_dir=folder, source="p.star", first_row=10)
    assert e.value.where == "p.star, row 11, rlnImageName"
    assert "2@gone.mrcs" in e.value.what and "not found" in e.value.what
    assert str((folder / "gone.mrcs").resolve()) in e.value.what
    with pytest.raises(UserError) as e:
        read_images(["2@gone.mrcs"], base_dir=folder)
    assert e.value.where == "gone.mrcs"
    with pytest.raises(UserError) as e:
        stack_info(folder / "gone.mrcs")
    assert e.value.where == str(folder / "gone.mrcs") and "not found" in e.value.what


def test_truncated_stack(stack3):
    folder, _ = stack3
    path = folder / "s.mrcs"
    with open(path, "r+b") as f:
        f.truncate(1024 + 2 * 8 * 8 * 4 + 10)
    with pytest.raises(UserError) as e:
        stack_info(path)
    assert e.value.where == str(path)
    assert "truncated" in e.value.what and "3 image(s) of 8 x 8" in e.value.what
    with pytest.raises(UserError) as e:
        read_images(["1@s.mrcs"], base_dir=folder, source="p.star")
    assert e.value.where == "p.star, row 1, rlnImageName" and "truncated" in e.value.what
    with pytest.raises(UserError):
        read_stack(path)


def test_index_past_end(stack3):
    folder, _ = stack3
    with pytest.raises(UserError) as e:
        read_images(["3@s.mrcs", "4@s.mrcs"], base_dir=folder, source="p.star")
    assert e.value.where == "p.star, row 2, rlnImageName"
    assert "4@s.mrcs" in e.value.what and "only 3 image(s)" in e.value.what
    with pytest.raises(UserError) as e:
        read_images(["0@s.mrcs"], base_dir=folder, source="p.star")
    assert e.value.where == "p.star, row 1, rlnImageName" and "from 1" in e.value.what


def test_bare_name_of_a_multi_image_stack(stack3):
    folder, _ = stack3
    with pytest.raises(UserError) as e:
        read_images(["s.mrcs"], base_dir=folder)
    assert "holds 3 images" in e.value.what


def test_not_an_mrc(tmp_path, rng):
    (tmp_path / "tiny.mrcs").write_bytes(b"hello")
    with pytest.raises(UserError) as e:
        stack_info(tmp_path / "tiny.mrcs")
    assert e.value.where == str(tmp_path / "tiny.mrcs") and "not an MRC file" in e.value.what
    (tmp_path / "junk.mrcs").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(UserError) as e:
        read_images(["1@junk.mrcs"], base_dir=tmp_path, source="p.star")
    assert e.value.where == "p.star, row 1, rlnImageName" and "not an MRC file" in e.value.what
    # A folder where a stack is expected.
    (tmp_path / "dir.mrcs").mkdir()
    with pytest.raises(UserError):
        stack_info(tmp_path / "dir.mrcs")


def test_corrupt_dimensions(stack3):
    folder, _ = stack3
    path = folder / "s.mrcs"
    with mrcfile.open(path, "r+") as m:
        m.header.nx = -8
    with pytest.raises(UserError) as e:
        stack_info(path)
    assert "corrupt" in e.value.what and "-8 x 8 x 3" in e.value.what


@pytest.mark.parametrize("mode,name", [(3, "complex int16"), (4, "complex float32"), (101, "packed 4-bit")])
def test_unsupported_mode(stack3, mode, name):
    folder, _ = stack3
    path = folder / "s.mrcs"
    with mrcfile.open(path, "r+") as m:
        m.header.mode = mode
    with pytest.raises(UserError) as e:
        read_images(["1@s.mrcs"], base_dir=folder)
    assert e.value.where == str(path)
    assert f"mode {mode} ({name}) is not supported" in e.value.what


def test_nan_and_inf_images(tmp_path, rng):
    data = rng.normal(size=(3, 8, 8)).astype(np.float32)
    data[1, 2, 3] = np.nan
    data[2, 0, 0] = np.inf
    write_stack(tmp_path / "s.mrcs", data, 1.0)
    with pytest.raises(UserError) as e:
        read_images(["1@s.mrcs", "3@s.mrcs", "2@s.mrcs"], base_dir=tmp_path, source="p.star", first_row=5)
    # Image 2 is checked first (images are read in stack order); it is row 7 of the STAR file.
    assert e.value.where == "p.star, row 7, rlnImageName"
    assert "2@s.mrcs contains NaN or Inf" in e.value.what
    with pytest.raises(UserError) as e:
        read_images(["3@s.mrcs"], base_dir=tmp_path)
    assert e.value.where == str(tmp_path / "s.mrcs") and "3@s.mrcs" in e.value.what
    got = read_images(["2@s.mrcs"], base_dir=tmp_path, check_finite=False)
    assert np.isnan(got[0, 2, 3])


def test_mixed_sizes(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((2, 8, 8), np.float32), 1.0)
    write_stack(tmp_path / "b.mrcs", np.zeros((2, 16, 16), np.float32), 1.0)
    with pytest.raises(UserError) as e:
        read_images(["1@a.mrcs", "2@b.mrcs"], base_dir=tmp_path, source="p.star")
    assert e.value.where == "p.star, row 2, rlnImageName"
    assert "1@a.mrcs is 8 x 8" in e.value.what and "2@b.mrcs is 16 x 16" in e.value.what


def test_non_square_and_odd(tmp_path):
    write_stack(tmp_path / "r.mrcs", np.zeros((2, 8, 6), np.float32), 1.0)
    with pytest.raises(UserError) as e:
        read_images(["1@r.mrcs"], base_dir=tmp_path)
    assert "6 x 8 pixels, not square" in e.value.what
    write_stack(tmp_path / "o.mrcs", np.zeros((2, 9, 9), np.float32), 1.0)
    with pytest.raises(UserError) as e:
        read_images(["1@o.mrcs"], base_dir=tmp_path)
    assert e.value.where == str(tmp_path / "o.mrcs") and "--new_box 8" in e.value.what
    assert read_images(["1@o.mrcs"], base_dir=tmp_path, allow_odd=True).shape == (1, 9, 9)


def test_empty_name_list():
    assert read_images([]).shape == (0, 0, 0)


# --- parity with RELION --------------------------------------------------------------

_STATS = re.compile(r"^(\S+) : .*avg= (\S+) stddev= (\S+) minval= (\S+) maxval= (\S+); angpix = (\S+)", re.M)


def _relion_stats(relion, target, cwd):
    out = subprocess.run([str(relion / "relion_image_handler"), "--stats", "--i", target], cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [(m[0], *map(float, m[1:])) for m in _STATS.findall(out.stdout)]


def _ours(img):
    a = np.asarray(img, dtype=np.float64)
    return a.mean(), a.std(), a.min(), a.max()


@pytest.mark.relion
def test_relion_reads_our_map_and_stack(relion, tmp_path, rng):
    vol = (rng.normal(size=(10, 12, 14)) * 3 + 1).astype(np.float32)
    write_map(tmp_path / "ours.mrc", vol, 1.7)
    images = (rng.normal(size=(3, 16, 16)) * 2 - 0.5).astype(np.float32)
    write_stack(tmp_path / "ours.mrcs", images, 2.25)

    def check(rel, expected, angpix):
        *stats, px = rel[1:]
        # RELION prints 6 significant digits
        np.testing.assert_allclose(stats, expected, rtol=2e-6, atol=1e-6)
        assert px == angpix

    (row,) = _relion_stats(relion, "ours.mrc", tmp_path)
    check(row, _ours(vol), 1.7)
    (row,) = _relion_stats(relion, "2@ours.mrcs", tmp_path)
    assert row[0] == "2@ours.mrcs"
    check(row, _ours(images[1]), 2.25)
    rows = _relion_stats(relion, "ours.mrcs", tmp_path)
    assert [r[0] for r in rows] == ["000001@ours.mrcs", "000002@ours.mrcs", "000003@ours.mrcs"]
    for r, img in zip(rows, images):
        check(r, _ours(img), 2.25)
