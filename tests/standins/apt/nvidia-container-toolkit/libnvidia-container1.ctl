# Stand-in for libnvidia-container1 (tests only): no library, just the package and its version.
Section: misc
Priority: optional
Standards-Version: 3.9.2
Package: libnvidia-container1
Version: @VERSION@
Maintainer: wsl-triton-llm stand-in <standin@invalid>
Architecture: all
Description: STAND-IN libnvidia-container1 for tests (not NVIDIA's)
 Empty.
