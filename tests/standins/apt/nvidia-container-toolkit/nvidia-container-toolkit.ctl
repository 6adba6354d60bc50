# Stand-in for nvidia-container-toolkit (tests only): the runtime hook exits 0, so that
# `docker run --gpus all` works on a machine without a GPU. Depends like the real package.
Section: misc
Priority: optional
Standards-Version: 3.9.2
Package: nvidia-container-toolkit
Version: @VERSION@
Maintainer: wsl-triton-llm stand-in <standin@invalid>
Architecture: all
Depends: nvidia-container-toolkit-base (= @VERSION@), libnvidia-container-tools (>= @VERSION@), libnvidia-container-tools (<< 2.0.0)
Files: nvidia-container-runtime-hook /usr/bin/
Description: STAND-IN nvidia-container-toolkit for tests (not NVIDIA's)
 nvidia-container-runtime-hook stand-in.
