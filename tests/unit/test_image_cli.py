"""`honeyfleet image build` refuses bad specs before it touches the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolnode.image import DEBIAN_DISK_MIB, Distro, GuestImageSpec, ImageBuildError, main


def test_a_debian_image_too_small_for_debian_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build", "--distro", "debian", "--disk-size-mib", "512", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert "at least 1024" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_distro_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["build", "--distro", "ubuntu", "--out", str(tmp_path)])


def test_distro_defaults() -> None:
    assert GuestImageSpec(out_dir=Path("x")).distro is Distro.BUSYBOX
    assert DEBIAN_DISK_MIB >= 4096  # a small cloud VM's disk, not busybox's 2 GiB
    with pytest.raises(ImageBuildError):
        GuestImageSpec(out_dir=Path("x"), distro=Distro.DEBIAN, disk_size_mib=512)
