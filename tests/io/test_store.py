"""The Zarr particle store: import, manifest, Fourier crop, verification, STAR-or-store input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryodask.errors import UserError
from cryodask.io import store as st
from cryodask.io.mrc import read_stack


def write_particles_fixture(folder: Path, n: int = 70, box: int = 32, *, stacks: int = 2, angpix: float = 1.5,
                            seed: int = 0, star_name: str = "particles.star") -> tuple[Path, np.ndarray, pd.DataFrame]:
    """MRC stacks + RELION 3.1 STAR written with mrcfile / starfile; returns (star, images in row order, particles)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Extract").mkdir(exist_ok=True)
    images = rng.normal(size=(n, box, box)).astype(np.float32) + np.arange(n, dtype=np.float32)[:, None, None]
    names = []
    per = -(-n // stacks)
    for s in range(stacks):
        block = images[s * per:(s + 1) * per]
        rel = f"Extract/stack{s}.mrcs"
        with mrcfile.new(folder / rel, overwrite=True) as m:
            m.set_data(block)
            m.set_image_stack()
            m.voxel_size = angpix
        names += [f"{k + 1:06d}@{rel}" for k in range(len(block))]
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnMicrographOriginalPixelSize": [angpix], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [angpix], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({
        "rlnImageName": names,
        "rlnMicrographName": [f"mic{k % 3}.mrc" for k in range(n)],
        "rlnDefocusU": rng.uniform(10000, 20000, n).round(2),
        "rlnOriginXAngst": rng.uniform(-3, 3, n).round(3),
        "rlnOriginYAngst": rng.uniform(-3, 3, n).round(3),
        "rlnOpticsGroup": np.ones(n, dtype=int),
    })
    star = folder / star_name
    starfile.write({"optics": optics, "particles": particles}, star)
    return star, images, particles


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stack paths are relative to the project folder, as in RELION
    return write_particles_fixture(tmp_path)


def test_import_round_trip_float32(dataset, tmp_path):
    star, images, particles = dataset
    s = st.import_particles(star, tmp_path / "p.zarr", chunk=16)
    assert (len(s), s.box, s.pixel_size, s.dtype, s.chunk, s.n_chunks) == (70, 32, 1.5, np.float32, 16, 5)
    assert [(x.start, x.stop) for x in s.chunk_slices()] == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
    np.testing.assert_array_equal(np.asarray(s.images[:]), images)  # bit for bit
    for i, sl in enumerate(s.chunk_slices()):
        chunk = s.read_chunk(i)
        assert chunk.dtype == np.float32 and chunk.shape == (sl.stop - sl.start, 32, 32)
        np.testing.assert_array_equal(chunk, images[sl])
        assert s.manifest["chunk_hashes"][i] == st.chunk_hash(images[sl])
        assert s.manifest["chunk_nbytes"][i] == 16 * 32 * 32 * 4  # a last partial chunk is stored full size
    m = s.manifest
    assert m["format"] == st.FORMAT and m["version"] == st.VERSION and m["hash"] == "blake2b-256"
    assert m["particles_hash"] == st.names_hash(particles["rlnImageName"].tolist())
    assert m["particle_set_hash"] == st.names_hash(sorted(particles["rlnImageName"]))
    assert m["particles_hash"] != m["particle_set_hash"]  # stack1 names sort before... differ in order
    assert not m["fourier_crop"] and m["original_box"] == 32
    # the full RELION table comes back from the store, in store order
    t = s.table
    assert t.particles["rlnImageName"].tolist() == particles["rlnImageName"].tolist()
    np.testing.assert_allclose(t.particles["rlnDefocusU"], particles["rlnDefocusU"])
    np.testing.assert_allclose(t.particles["rlnOriginXAngst"], particles["rlnOriginXAngst"])
    assert t.optics["rlnVoltage"].tolist() == [300.0]
    assert s.path == tmp_path / "p.zarr" and not list(tmp_path.glob("p.zarr.tmp-*"))
    s.verify()
    import zarr

    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    assert g.attrs["cryodask"] == {"format": st.FORMAT, "version": st.VERSION, "manifest": "manifest.json"}
    assert g["images"].shards is None and g["images"].chunks == (16, 32, 32)


def test_float16_halves_the_store(dataset, tmp_path):
    star, images, _ = dataset
    s32 = st.import_particles(star, tmp_path / "a.zarr", chunk=16)
    s16 = st.import_particles(star, tmp_path / "b.zarr", chunk=16, float16=True)
    assert s16.dtype == np.float16 and s16.images.dtype == np.float16
    c = s16.read_chunk(1)
    assert c.dtype == np.float32
    np.testing.assert_array_equal(c, images[16:32].astype(np.float16).astype(np.float32))
    assert np.abs(c - images[16:32]).max() > 0  # it really is half precision
    img32 = sum(s32.manifest["chunk_nbytes"])
    assert sum(s16.manifest["chunk_nbytes"]) * 2 == img32
    assert s16.manifest["chunk_hashes"] != s32.manifest["chunk_hashes"]
    s16.verify()


def test_default_chunk_is_a_few_megabytes():
    assert [st.default_chunk(b) for b in (32, 64, 128, 256, 400, 1024)] == [1024, 1024, 256, 64, 32, 16]


# --- Fourier crop ------------------------------------------------------------------------------

def _cosines(box: int, pixel: float, waves) -> np.ndarray:
    """A sum of plane cosines (frequencies in 1/Å) sampled on a box grid of the given pixel size."""
    y, x = np.mgrid[0:box, 0:box] * pixel
    return sum(a * np.cos(2 * np.pi * (fx * x + fy * y) + ph) for a, fx, fy, ph in waves)


def test_fourier_crop_resamples_band_limited_images_exactly():
    # 64 px of 1 Å cover 64 Å; the crop to 32 px gives 2 Å pixels and Nyquist 1/4 Å^-1.
    waves = [(1.0, 3 / 64, 0, 0.3), (0.5, 5 / 64, -7 / 64, 1.1), (0.25, -9 / 64, 2 / 64, 0.0)]
    big = (_cosines(64, 1.0, waves) + 2.5).astype(np.float32)
    small = st.fourier_crop(big[None], 32)[0]
    want = _cosines(32, 2.0, waves) + 2.5
    assert small.dtype == np.float32 and small.shape == (32, 32)
    np.testing.assert_allclose(small, want, atol=2e-5)
    assert small.mean() == pytest.approx(2.5, abs=1e-5)  # mean kept: RELION's forward-only normalisation


def test_fourier_crop_keeps_constants_and_scales_white_noise_variance(rng):
    const = np.full((2, 64, 64), 7.25, np.float32)
    np.testing.assert_allclose(st.fourier_crop(const, 16), 7.25, rtol=1e-6)
    noise = rng.normal(0, 2.0, size=(64, 128, 128)).astype(np.float32)
    small = st.fourier_crop(noise, 64)
    # only (64/128)^2 of white noise's variance lies inside the new Nyquist
    assert small.var() == pytest.approx(4.0 * 0.25, rel=0.02)
    with pytest.raises(ValueError):
        st.fourier_crop(noise, 63)


@pytest.mark.relion
def test_fourier_crop_matches_relion_image_handler(relion, tmp_path, rng):
    x = (rng.normal(size=(3, 64, 64)) + 5).astype(np.float32)
    with mrcfile.new(tmp_path / "in.mrcs") as m:
        m.set_data(x)
        m.set_image_stack()
        m.voxel_size = 1.0
    subprocess.run([str(relion / "relion_image_handler"), "--i", "in.mrcs", "--o", "out.mrcs", "--angpix", "1",
                    "--rescale_angpix", "2"], cwd=tmp_path, check=True, capture_output=True)
    want = mrcfile.read(tmp_path / "out.mrcs")
    got = st.fourier_crop(x, 32)
    assert want.shape == (3, 32, 32)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


def test_new_box_import_updates_optics_and_pixel_size(dataset, tmp_path):
    star, images, particles = dataset
    s = st.import_particles(star, tmp_path / "c.zarr", new_box=16, chunk=32)
    assert (s.box, s.pixel_size) == (16, 3.0)
    m = s.manifest
    assert (m["original_box"], m["original_pixel_size"], m["fourier_crop"]) == (32, 1.5, True)
    np.testing.assert_allclose(s.read_chunk(2), st.fourier_crop(images[64:70], 16), atol=1e-5)
    t = s.table
    assert t.optics["rlnImageSize"].tolist() == [16]
    assert t.optics["rlnImagePixelSize"].tolist() == [3.0]
    assert t.optics["rlnMicrographOriginalPixelSize"].tolist() == [1.5]  # unchanged
    np.testing.assert_allclose(t.particles["rlnOriginXAngst"], particles["rlnOriginXAngst"])  # Å: unchanged
    assert t.pixel_size() == 3.0 and t.box_size() == 16


# --- damage, atomicity --------------------------------------------------------------------------

def test_verify_names_the_damaged_chunk(dataset, tmp_path):
    star, _, _ = dataset
    s = st.import_particles(star, tmp_path / "d.zarr", chunk=16)
    f = s.chunk_file(2)
    raw = bytearray(f.read_bytes())
    raw[100] ^= 0xFF
    f.write_bytes(bytes(raw))
    s.verify(chunks=[0, 1, 3, 4])  # the others are fine
    with pytest.raises(UserError, match=r"chunk 2 \(particles 33-48\) differs from the manifest"):
        s.verify()
    s.chunk_file(4).unlink()
    with pytest.raises(UserError, match="chunk 4 .*missing"):
        s.read_chunk(4)


def test_failed_import_leaves_nothing(dataset, tmp_path):
    star, images, _ = dataset
    with mrcfile.open(tmp_path / "Extract/stack1.mrcs", mode="r+") as m:
        m.data[20, 3, 3] = np.nan  # row 56, in the fourth chunk: three chunks are written first
    with pytest.raises(UserError, match="row 56.*NaN"):
        st.import_particles(star, tmp_path / "e.zarr", chunk=16)
    assert not (tmp_path / "e.zarr").exists()
    assert not list(tmp_path.glob("e.zarr*"))


def test_overwrite_only_replaces_a_store(dataset, tmp_path):
    star, _, _ = dataset
    st.import_particles(star, tmp_path / "f.zarr", chunk=16)
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        st.import_particles(star, tmp_path / "f.zarr")
    s = st.import_particles(star, tmp_path / "f.zarr", chunk=32, overwrite=True)
    assert s.chunk == 32 and st.open_store(tmp_path / "f.zarr").n_chunks == 3
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a cryodask particle store"):
        st.import_particles(star, tmp_path / "precious", overwrite=True)
    assert (tmp_path / "precious" / "data.txt").read_text() == "keep me"
    assert not list(tmp_path.glob("*.old-*")) and not list(tmp_path.glob("*.tmp-*"))


def test_import_reads_chunk_by_chunk(tmp_path, monkeypatch):
    """Streaming: one read per chunk, never the whole set, and a traced peak far below the data size."""
    import tracemalloc

    import cryodask.io.mrc as mrc

    monkeypatch.chdir(tmp_path)
    star, images, _ = write_particles_fixture(tmp_path, n=2400, box=64, stacks=3)
    data_bytes = images.nbytes  # 39 MB
    del images
    calls = []
    real = mrc.read_images

    def spy(names, **kw):
        calls.append(len(names))
        return real(names, **kw)

    monkeypatch.setattr(mrc, "read_images", spy)
    tracemalloc.start()
    try:
        s = st.import_particles(star, tmp_path / "g.zarr", chunk=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s.n_chunks == 38
    assert sum(calls) == 2400 and max(calls) == 16 and len(calls) == 37 * 4 + 2  # sub-batches of 1/4 chunk
    # a chunk is 1 MB: one being read, one queued, one being written (+ the table) stay under 5 chunks
    chunk_bytes = 64 * 64 * 64 * 4
    assert peak < 5 * chunk_bytes < data_bytes / 4, peak


def test_killed_import_leaves_no_store(tmp_path):
    """SIGKILL mid-import: the output path never appears; only a *.tmp-<pid> folder remains."""
    star, _, _ = write_particles_fixture(tmp_path, n=64, box=16)
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        os.chdir({str(tmp_path)!r})
        import cryodask.io.mrc as mrc
        real = mrc.read_images
        def slow(names, **kw):
            time.sleep(0.3)
            return real(names, **kw)
        mrc.read_images = slow
        from cryodask.io.store import import_particles
        import_particles("particles.star", "k.zarr", chunk=4)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            tmp = list(tmp_path.glob("k.zarr.tmp-*"))
            if tmp and list((tmp[0] / "images").glob("c/*/0/0")):
                break
            assert proc.poll() is None, "the import process ended before it was killed"
            time.sleep(0.05)
        else:
            pytest.fail("the import never started writing chunks")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "k.zarr").exists()
    with pytest.raises(UserError, match="not found"):
        st.open_particles(tmp_path / "k.zarr")
    with pytest.raises(UserError, match="not a cryodask particle store"):
        st.open_store(next(tmp_path.glob("k.zarr.tmp-*")))


# --- STAR or store --------------------------------------------------------------------------------

def test_open_particles_detects_star_or_store_by_content(dataset, tmp_path):
    star, images, particles = dataset
    s = st.import_particles(star, tmp_path / "h.zarr", chunk=16)
    os.rename(tmp_path / "h.zarr", tmp_path / "renamed_store")  # no .zarr extension
    a = st.open_particles(tmp_path / "renamed_store")
    assert isinstance(a, st.ParticleStore) and a.n_chunks == 5
    assert isinstance(st.open_particles(tmp_path / "renamed_store" / "zarr.json"), st.ParticleStore)
    (tmp_path / "particles.txt").write_text(star.read_text())  # a STAR file by content, not by name
    b = st.open_particles(tmp_path / "particles.txt", chunk=16)
    assert isinstance(b, st.StarParticles)
    assert (b.n_chunks, b.box, b.pixel_size, len(b)) == (5, 32, 1.5, 70)
    for i in range(5):
        np.testing.assert_array_equal(b.read_chunk(i), a.read_chunk(i))
    assert b.table.particles["rlnImageName"].tolist() == a.table.particles["rlnImageName"].tolist()
    assert s.chunk == 16


def test_open_particles_refuses_other_things(dataset, tmp_path):
    with pytest.raises(UserError, match="MRC image, neither a STAR file nor a particle store"):
        st.open_particles(tmp_path / "Extract" / "stack0.mrcs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a particle store"):
        st.open_particles(tmp_path / "empty")
    with pytest.raises(UserError, match="file not found"):
        st.open_particles(tmp_path / "nothing.star")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(UserError, match="not a STAR file"):
        st.open_particles(tmp_path / "notes.txt")
    with pytest.raises(UserError, match="not a cryodask particle store"):
        st.open_store(tmp_path / "empty")


def test_store_pickles_as_its_path(dataset, tmp_path):
    import pickle

    star, images, _ = dataset
    s = st.import_particles(star, tmp_path / "i.zarr", chunk=16)
    blob = pickle.dumps(s)
    assert len(blob) < 500
    np.testing.assert_array_equal(pickle.loads(blob).read_chunk(4), images[64:70])
    assert json.loads((tmp_path / "i.zarr" / "manifest.json").read_text())["n_chunks"] == 5


# --- real RELION files (../shared/data) -----------------------------------------------------------

def test_import_real_relion31_refinement(shared_data, tmp_path):
    star = shared_data / "star/cryodrgn/relion31.star"  # RELION 3.1 run_data.star, 5 x 256 px, 2.806 Å
    s = st.import_particles(star, tmp_path / "r.zarr", new_box=128)
    assert (len(s), s.box, s.chunk, s.n_chunks) == (5, 128, 5, 1)
    assert s.pixel_size == pytest.approx(5.612)
    raw = read_stack(shared_data / "star/cryodrgn/relion31.mrcs", mmap=False)
    np.testing.assert_allclose(s.read_chunk(0), st.fourier_crop(raw.astype(np.float32), 128), atol=1e-4)
    from cryodask.io.star import read_particles

    src = read_particles(star)
    t = s.table
    assert list(t.particles.columns) == list(src.particles.columns)  # every RELION column kept
    np.testing.assert_allclose(t.particles["rlnAngleRot"], src.particles["rlnAngleRot"])
    np.testing.assert_allclose(t.particles["rlnOriginXAngst"], src.particles["rlnOriginXAngst"])
    assert (t.optics["rlnImageSize"].tolist(), t.optics["rlnImagePixelSize"].tolist()) == ([128], [5.612])
    assert t.optics["rlnMicrographOriginalPixelSize"].tolist() == [1.403]


def test_import_real_relion30_fills_in_the_box(shared_data, tmp_path):
    """RELION 3.0 layout (no optics block, no rlnImageSize): the box comes from the stack."""
    s = st.import_particles(shared_data / "star/aspire/sample_particles_relion30.star", tmp_path / "r.zarr",
                            float16=True)
    assert (len(s), s.box, s.dtype) == (17, 200, np.float16)
    assert s.table.optics["rlnImageSize"].tolist() == [200] * len(s.table.optics)
    raw = read_stack(shared_data / "star/aspire/sample.mrcs", mmap=False)
    np.testing.assert_array_equal(s.read_chunk(0), raw.astype(np.float16).astype(np.float32))


def test_import_real_files_refused(shared_data, tmp_path):
    with pytest.raises(UserError, match="pixel size .* not known.*--angpix"):
        st.import_particles(shared_data / "star/aspire/rln_proj_64.star", tmp_path / "a.zarr")
    assert st.import_particles(shared_data / "star/aspire/rln_proj_64.star", tmp_path / "a.zarr",
                               angpix=1.0).pixel_size == 1.0
    with pytest.raises(UserError, match="odd box of 65"):
        st.import_particles(shared_data / "star/aspire/rln_proj_65.star", tmp_path / "b.zarr", angpix=1.0)
    assert not (tmp_path / "b.zarr").exists()


def test_disk_full_while_writing_is_a_user_error(dataset, tmp_path, monkeypatch):
    import errno

    import zarr

    star, _, _ = dataset
    real = zarr.Array.__setitem__
    calls = []

    def full(self, key, value):
        calls.append(key)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    with pytest.raises(UserError, match=r"cannot write the store \(No space left on device\)") as e:
        st.import_particles(star, tmp_path / "full.zarr", chunk=16)
    assert e.value.where == str(tmp_path / "full.zarr") and len(calls) == 3
    assert not list(tmp_path.glob("full.zarr*"))
    with pytest.raises(UserError, match="folder .*nowhere does not exist"):
        st.import_particles(star, tmp_path / "nowhere" / "x.zarr")


def test_small_data_sets_default_to_several_chunks(dataset, tmp_path):
    """The default chunk keeps ~16 MB for large data sets but cuts a small one into several tasks (>= 32 each),
    from the data alone (so the same seed gives the same chunks on any cluster)."""
    star, _, _ = dataset  # 70 particles at box 32: default_chunk would put them all in one chunk
    assert st.data_chunk(32, 70) == 32 and st.data_chunk(32, 100_000) == st.default_chunk(32) == 1024
    assert st.data_chunk(64, 3000) == 188  # 16 tasks
    assert st.open_particles(star).n_chunks == 3
    assert st.import_particles(star, tmp_path / "d.zarr").n_chunks == 3
