#!/bin/busybox sh
# TEST ONLY: /init of the nested-test initramfs (image-builder/src/nested_test/mod.rs).
# The kernel hands its unrecognised boot options (noxsave, nopcid, ... that genos-vmm's baseline
# CPU template adds) to init as arguments, which genos-agent refuses; exec keeps PID 1 for the
# agent and gives it its own arguments. Nothing else runs: a guest system call costs ~1.2 ms here.
exec /sbin/genos-agent --initramfs
