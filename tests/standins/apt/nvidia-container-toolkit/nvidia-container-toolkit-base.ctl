# Stand-in for nvidia-container-toolkit-base (tests only): nvidia-ctk (a small Python script:
# --version, runtime configure, cdi generate, cdi list) and nvidia-container-runtime (execs runc).
Section: misc
Priority: optional
Standards-Version: 3.9.2
Package: nvidia-container-toolkit-base
Version: @VERSION@
Maintainer: wsl-triton-llm stand-in <standin@invalid>
Architecture: all
Depends: python3
Files: nvidia-ctk /usr/bin/
 nvidia-container-runtime /usr/bin/
Description: STAND-IN nvidia-container-toolkit-base for tests (not NVIDIA's)
 nvidia-ctk and nvidia-container-runtime stand-ins.
