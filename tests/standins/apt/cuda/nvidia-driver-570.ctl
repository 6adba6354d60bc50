# Decoy (tests only): a Linux NVIDIA driver. On WSL it would shadow the Windows driver's
# libcuda in /usr/lib/wsl/lib; it must never be installed there.
Section: misc
Priority: optional
Standards-Version: 3.9.2
Package: nvidia-driver-570
Version: 570.124.06-0ubuntu1
Maintainer: wsl-triton-llm stand-in <standin@invalid>
Architecture: all
Description: STAND-IN decoy NVIDIA Linux driver for tests (not NVIDIA's)
 Empty.
