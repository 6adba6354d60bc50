# Stand-in for the cuda-toolkit-12-8 metapackage (tests only): nvcc prints a version and
# compiles nothing. Installs under /usr/local/cuda-12.8 with the /usr/local/cuda link, as the
# real packages do (outside Debian policy, hence the builder's dh_usrlocal override).
Section: misc
Priority: optional
Standards-Version: 3.9.2
Package: cuda-toolkit-12-8
Version: 12.8.1-1
Maintainer: wsl-triton-llm stand-in <standin@invalid>
Architecture: all
Files: nvcc /usr/local/cuda-12.8/bin/
Links: /usr/local/cuda-12.8 /usr/local/cuda
Description: STAND-IN CUDA Toolkit 12.8 meta-package for tests (not NVIDIA's)
 Ships a fake nvcc that only answers --version.
