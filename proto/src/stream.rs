//! Client↔hostd streaming protocol: framing, messages and their codecs (sans-IO).
