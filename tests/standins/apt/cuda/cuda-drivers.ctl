# Decoy (tests only): the Linux display driver metapackage. Never on WSL.
Section: misc
Priority: optional
Standards-Version: 3.9.2
Package: cuda-drivers
Version: 570.124.06-1
Maintainer: wsl-triton-llm stand-in <standin@invalid>
Architecture: all
Depends: nvidia-driver-570 (>= 570.124.06)
Description: STAND-IN decoy cuda-drivers for tests (not NVIDIA's)
 Depends on nvidia-driver-570, like the real one.
