//! Framebuffer to H.264 encoding and decoding.
