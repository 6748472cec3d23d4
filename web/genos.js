// GenOS browser client: the stream protocol (docs/protocol.md) over a WebSocket to the host
// that served this page (docs/web-client.md), video through WebCodecs, keyboard, mouse and
// wheel back to the environment. Counters for tests and the curious are on window.genos.
"use strict";

(() => {
  const PROTOCOL_VERSION = 1;
  const K = GENOS_KEYMAP; // KeyboardEvent.code -> evdev code (web/keymap.js)
  const MSG_CONTROL = 0x00; // server -> client: one framed control message follows
  const FRAME_TYPE = 0x01; // server -> client: a video frame (27-byte header + access unit)
  const FRAME_HEADER_LEN = 27;
  const CLOSE_CODE_BASE = 4000;
  const KEYFRAME_REQUEST_INTERVAL_MS = 300;
  const MAX_DECODE_QUEUE = 8;

  const ERRORS = {
    1: "UnsupportedVersion", 2: "ProtocolViolation", 3: "BadToken", 4: "TokenForged",
    5: "TokenExpired", 6: "WrongEnvironment", 7: "NoSuchEnvironment", 8: "PermissionDenied",
    9: "TooManyConnections", 10: "ResumeRejected", 11: "Internal", 12: "ServerShutdown",
    13: "TokenRevoked", 14: "SessionExpiring", 15: "Unavailable",
  };
  const NON_FATAL = new Set([8, 14, 15]);
  // What a person is told, by error code.
  const PAGES = {
    3: ["This link is not valid", "The link is damaged or was not issued by this host. Ask for a new link."],
    4: ["This link is not valid", "The link is damaged or was not issued by this host. Ask for a new link."],
    5: ["This link has expired", "Ask for a new link (genos token ENV --web)."],
    6: ["This link is for another environment", "Ask for a link to this environment."],
    7: ["The environment is not running", "It was stopped or destroyed. Start it and open a new link."],
    8: ["This link may not view the environment", "Ask for a link with the view right."],
    9: ["Too many viewers", "The host has as many viewers as it allows. Try again later."],
    12: ["The host is shutting down", "Try again in a moment."],
    13: ["This link was revoked", "Ask for a new link."],
  };

  const g = (window.genos = {
    state: "connecting",
    framesReceived: 0,
    framesDecoded: 0,
    drawnSequence: null,
    framesDropped: 0,
    decodeErrors: 0,
    keyframeRequests: 0,
    inputSent: 0,
    resizeRequests: 0,
    codec: null,
    transport: null,
    width: 0,
    height: 0,
    rights: 0,
    error: null,
    notices: [],
    cursor: null,
    clipboard: null,
    clipboardSent: 0,
    sessionId: null,
    resumed: false,
    reconnects: 0,
    wakeLock: null,
    clockOffsetUs: null, // the host's clock minus the page's (µs), from the best Ping round trip
    reportsSent: 0, // Stats reports sent to the host
  });

  const canvas = document.getElementById("screen");
  const ctx = canvas.getContext("2d", { alpha: false });
  const statusEl = document.getElementById("status");
  const bannerEl = document.getElementById("banner");

  function showError(title, text, detail) {
    g.state = "error";
    document.getElementById("overlay").hidden = true;
    document.getElementById("error-title").textContent = title;
    document.getElementById("error-text").textContent = text;
    document.getElementById("error-detail").textContent = detail || "";
    document.getElementById("error").hidden = false;
    statusEl.hidden = true;
    canvas.hidden = true;
  }

  function fail(code, message) {
    if (g.state === "error") return;
    g.error = { code, name: ERRORS[code] || "Unknown", message };
    const [title, text] = PAGES[code] || ["Connection refused", "The host ended the session."];
    showError(title, text, `${g.error.name}: ${message}`);
    if (ws) ws.close();
    if (wt) wt.close();
  }

  // --- the link: #env=ENV&token=TOKEN --------------------------------------------------------
  const params = new URLSearchParams(location.hash.slice(1));
  const envId = params.get("env");
  const token = params.get("token");
  if (!envId || !token) {
    showError("This page needs a link", "Open the https:// link that genos token ENV --web printed.");
    return;
  }
  if (typeof VideoDecoder === "undefined") {
    g.error = { code: 0, name: "NoWebCodecs", message: "window.VideoDecoder is missing" };
    showError("This browser cannot decode video",
      "It has no WebCodecs VideoDecoder. Use a current Chrome, Edge, Safari (16.4+) or Firefox (130+).",
      "NoWebCodecs: window.VideoDecoder is missing");
    return;
  }

  // --- reload: the session survives it -------------------------------------------------------
  // The link (its fragment) survives a reload; so does this tab's sessionStorage, where the
  // session's id (for this link: the token's last characters) and the keys held when the page
  // went away are kept. The reloaded page resumes the session and releases those keys.
  const SESSION_KEY = `genos-session:${envId}`;
  const tokenTag = token.slice(-16);
  let stored = null;
  try {
    stored = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
  } catch (_) { /* no storage (private mode): a reload starts a new session */ }
  if (!stored || stored.tag !== tokenTag || !/^[0-9a-f]{32}$/.test(stored.id || "")) stored = null;
  function storeSession(held) {
    try {
      if (!g.sessionId) sessionStorage.removeItem(SESSION_KEY);
      else sessionStorage.setItem(SESSION_KEY, JSON.stringify({ tag: tokenTag, id: g.sessionId, held: [...held] }));
    } catch (_) { /* as above */ }
  }

  // --- encoding ------------------------------------------------------------------------------
  const enc = new TextEncoder();
  function message(type, bodyLen, fill) {
    const buf = new ArrayBuffer(5 + bodyLen);
    const v = new DataView(buf);
    v.setUint32(0, 1 + bodyLen, true);
    v.setUint8(4, type);
    if (fill) fill(v, 5, new Uint8Array(buf));
    return buf;
  }

  // The transport: WebTransport where the browser has it (and the host answers), else a
  // WebSocket; `#...&transport=websocket|webtransport` forces one.
  let ws = null;
  let wtWriter = null;
  // From Welcome: what a reconnect resumes (or, before the first, what the page had before
  // a reload).
  let sessionId = stored && new Uint8Array(stored.id.match(/../g).map((h) => parseInt(h, 16)));
  let resumeGraceMs = 0;
  function send(buf) {
    if (wtWriter) wtWriter.write(new Uint8Array(buf)).catch(() => {});
    else if (ws && ws.readyState === WebSocket.OPEN) ws.send(buf);
  }

  function hello(viewportW, viewportH) {
    const env = enc.encode(envId);
    const tok = enc.encode(token);
    return message(0x01, 4 + 2 + env.length + 2 + tok.length + 16 + 4, (v, o, b) => {
      v.setUint16(o, PROTOCOL_VERSION, true);
      v.setUint16(o + 2, PROTOCOL_VERSION, true);
      v.setUint16(o + 4, env.length, true);
      b.set(env, o + 6);
      let p = o + 6 + env.length;
      v.setUint16(p, tok.length, true);
      b.set(tok, p + 2);
      if (sessionId) b.set(sessionId, p + 2 + tok.length); // resume it; zeros: a new session
      p += 2 + tok.length + 16;
      v.setUint16(p, viewportW, true);
      v.setUint16(p + 2, viewportH, true);
    });
  }

  const canInput = () => g.state === "open" && (g.rights & 2) !== 0;
  function sendInput(buf) {
    if (!canInput()) return;
    g.inputSent++;
    send(buf);
  }
  const keyMsg = (code, pressed) =>
    message(0x10, 3, (v, o) => { v.setUint16(o, code, true); v.setUint8(o + 2, pressed ? 1 : 0); });
  const moveMsg = (x, y) =>
    message(0x11, 4, (v, o) => { v.setUint16(o, x, true); v.setUint16(o + 2, y, true); });
  const buttonMsg = (button, pressed) =>
    message(0x12, 2, (v, o) => { v.setUint8(o, button); v.setUint8(o + 1, pressed ? 1 : 0); });
  const wheelMsg = (dx, dy) =>
    message(0x13, 4, (v, o) => { v.setInt16(o, dx, true); v.setInt16(o + 2, dy, true); });
  const resizeMsg = (w, h) =>
    message(0x09, 4, (v, o) => { v.setUint16(o, w, true); v.setUint16(o + 2, h, true); });
  // The page's wall clock in microseconds, finer than Date.now()'s milliseconds (Ping, Pong
  // and the latency of each frame use it).
  const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
  const pingMsg = () =>
    message(0x0b, 8, (v, o) => { v.setBigUint64(o, BigInt(nowUs()), true); });

  let lastKeyframeRequest = -Infinity;
  function requestKeyframe() {
    const now = performance.now();
    if (now - lastKeyframeRequest < KEYFRAME_REQUEST_INTERVAL_MS) return;
    lastKeyframeRequest = now;
    g.keyframeRequests++;
    send(message(0x02, 0));
  }

  // --- resize: the guest display follows the viewport (docs/protocol.md §11) ---------------
  let resizeTimer = 0;
  let resizeAsked = null; // "WxH" last requested
  let resizeStopped = false; // refused for this session
  function scheduleResize() {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(sendResize, 300); // wait until the size holds still
  }
  function sendResize() {
    if (resizeStopped || !canInput()) return;
    fitCanvas();
    let w = canvas.width & ~1;
    let h = canvas.height & ~1;
    const clamp = (n, lo, hi) => Math.min(Math.max(n, lo), hi);
    if (w >= h) { w = clamp(w, 64, 3840); h = clamp(h, 64, 2160); }
    else { w = clamp(w, 64, 2160); h = clamp(h, 64, 3840); }
    const want = `${w}x${h}`;
    if (want === `${g.width}x${g.height}` || want === resizeAsked) return;
    resizeAsked = want;
    g.resizeRequests++;
    send(resizeMsg(w, h));
  }
  window.addEventListener("resize", scheduleResize);

  // --- drawing -------------------------------------------------------------------------------
  // Where the picture sits on the canvas (device pixels), letterboxed with square pixels.
  let rect = { x: 0, y: 0, w: 1, h: 1 };
  function fitCanvas() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
    const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, w, h);
    }
    if (g.width && g.height) {
      const scale = Math.min(w / g.width, h / g.height);
      const rw = Math.round(g.width * scale);
      const rh = Math.round(g.height * scale);
      rect = { x: Math.floor((w - rw) / 2), y: Math.floor((h - rh) / 2), w: rw, h: rh };
    }
  }
  window.addEventListener("resize", fitCanvas);

  let lastFrame = null;
  function draw(frame) {
    fitCanvas();
    ctx.drawImage(frame, rect.x, rect.y, rect.w, rect.h);
  }

  // The picture as drawn on the canvas, RGBA, base64: what tests compare with the source.
  g.capture = () => {
    const img = ctx.getImageData(rect.x, rect.y, rect.w, rect.h);
    let s = "";
    const d = img.data;
    for (let i = 0; i < d.length; i += 0x8000) s += String.fromCharCode.apply(null, d.subarray(i, i + 0x8000));
    return { width: rect.w, height: rect.h, rgba: btoa(s) };
  };

  // --- video ---------------------------------------------------------------------------------
  let decoder = null;
  let configured = null; // "codec WxH" the decoder is configured for
  let needKeyframe = true;
  let lastSequence = 0;
  const sequenceOf = new Map(); // chunk timestamp -> frame sequence, until decoded
  const submittedAt = new Map(); // chunk timestamp -> when it went to the decoder

  function newDecoder() {
    if (decoder && decoder.state !== "closed") decoder.close();
    configured = null;
    decoder = new VideoDecoder({
      output: (frame) => {
        g.framesDecoded++;
        g.drawnSequence = sequenceOf.get(frame.timestamp);
        const submitted = submittedAt.get(frame.timestamp);
        const decodeMs = submitted === undefined ? null : performance.now() - submitted;
        for (const t of submittedAt.keys()) if (t <= frame.timestamp) submittedAt.delete(t);
        for (const t of sequenceOf.keys()) if (t <= frame.timestamp) sequenceOf.delete(t);
        if (lastFrame) lastFrame.close();
        lastFrame = frame;
        const drawStart = performance.now();
        draw(frame);
        const drawMs = performance.now() - drawStart;
        // Glass-to-glass: captured (server clock) to painted on the canvas (page clock,
        // corrected by the offset from Pong), once the page knows the offset.
        const latencyMs = clockOffsetUs === null ? null : (nowUs() - clockOffsetUs - frame.timestamp) / 1000;
        recordFrame(decodeMs, latencyMs, drawMs, frame.timestamp);
      },
      error: (e) => {
        g.decodeErrors++;
        g.notices.push(`decoder: ${e.message}`);
        // A broken decoder is replaced; the next keyframe starts it again.
        needKeyframe = true;
        setTimeout(() => { newDecoder(); requestKeyframe(); }, 0);
      },
    });
  }

  // avc1.PPCCLL from the first SPS of an Annex B access unit (profile, constraints, level).
  function codecOf(au) {
    for (let i = 0; i + 4 < au.length; i++) {
      if (au[i] === 0 && au[i + 1] === 0 && au[i + 2] === 1 && (au[i + 3] & 0x1f) === 7) {
        const hex = (b) => b.toString(16).padStart(2, "0");
        return `avc1.${hex(au[i + 4])}${hex(au[i + 5])}${hex(au[i + 6])}`;
      }
    }
    return null;
  }

  function onFrame(buf) {
    const v = new DataView(buf);
    if (buf.byteLength < FRAME_HEADER_LEN) return fail(2, "short frame");
    const sequence = Number(v.getBigUint64(1, true));
    const captureUs = Number(v.getBigUint64(9, true));
    const keyframe = v.getUint8(17) === 1;
    const width = v.getUint16(19, true);
    const height = v.getUint16(21, true);
    const len = v.getUint32(23, true);
    if (FRAME_HEADER_LEN + len !== buf.byteLength) return fail(2, "frame length mismatch");
    const au = new Uint8Array(buf, FRAME_HEADER_LEN, len);
    g.framesReceived++;
    statBytes += buf.byteLength;
    // The server sends a keyframe after any frame it skipped; a gap we see means we must wait.
    if (!keyframe && (needKeyframe || sequence !== lastSequence + 1)) {
      g.framesDropped++;
      needKeyframe = true;
      requestKeyframe();
      lastSequence = sequence;
      return;
    }
    lastSequence = sequence;
    if (decoder.decodeQueueSize > MAX_DECODE_QUEUE && !keyframe) {
      // Decoding falls behind: skip to the next keyframe rather than lag (newest wins).
      g.framesDropped++;
      needKeyframe = true;
      requestKeyframe();
      return;
    }
    if (keyframe) {
      const codec = codecOf(au) || "avc1.42E01F";
      const want = `${codec} ${width}x${height}`;
      if (want !== configured) {
        decoder.configure({ codec, codedWidth: width, codedHeight: height, optimizeForLatency: true });
        configured = want;
        g.codec = codec;
      }
      g.width = width;
      g.height = height;
      needKeyframe = false;
    }
    sequenceOf.set(captureUs, sequence);
    submittedAt.set(captureUs, performance.now());
    decoder.decode(new EncodedVideoChunk({ type: keyframe ? "key" : "delta", timestamp: captureUs, data: au }));
  }

  // --- control -------------------------------------------------------------------------------
  const dec = new TextDecoder("utf-8", { fatal: true });
  function onControl(buf) {
    const v = new DataView(buf, 1);
    if (v.byteLength < 5 || v.getUint32(0, true) !== v.byteLength - 4) return fail(2, "bad control message");
    const type = v.getUint8(4);
    const o = 5;
    switch (type) {
      case 0x81: { // Welcome
        sessionId = new Uint8Array(buf.slice(1 + o + 2, 1 + o + 18));
        g.sessionId = Array.from(sessionId, (b) => b.toString(16).padStart(2, "0")).join("");
        g.resumed = v.getUint8(o + 19) === 1;
        resumeGraceMs = v.getUint32(o + 20, true);
        g.rights = v.getUint8(o + 18);
        pasteButton.hidden = (g.rights & 6) !== 6; // input and clipboard
        g.width = v.getUint16(o + 24, true);
        g.height = v.getUint16(o + 26, true);
        g.state = "open";
        statusEl.hidden = true;
        canvas.focus();
        scheduleResize();
        readHostClipboard();
        send(pingMsg()); // the clock offset for latency, at once
        holdWakeLock();
        // Keys let go while the connection was down (or held when the page was reloaded)
        // are released now.
        if (stored && g.resumed) for (const code of (stored.held || []).filter(Number.isInteger)) releaseOnReconnect.add(code);
        stored = null;
        if (g.resumed) for (const code of releaseOnReconnect) sendInput(keyMsg(code, false));
        releaseOnReconnect.clear();
        storeSession([]);
        break;
      }
      case 0x82: // Config: a new size comes with the next keyframe
        g.width = v.getUint16(o, true);
        g.height = v.getUint16(o + 2, true);
        break;
      case 0x86: { // Error
        const code = v.getUint16(o, true);
        const len = v.getUint16(o + 2, true);
        const text = dec.decode(new Uint8Array(buf, 1 + o + 4, len));
        if (NON_FATAL.has(code)) {
          g.notices.push(`${ERRORS[code]}: ${text}`);
          if (code === 8 && text.startsWith("resize")) resizeStopped = true;
          if (code === 8 && text.startsWith("clipboard")) clipboardStopped = true;
          if (code === 14) clipboardStopped = true;
          if (code === 14) {
            bannerEl.textContent = "This link expired: input is no longer accepted and the video ends soon.";
            bannerEl.hidden = false;
            releaseAll();
            g.rights &= ~2;
          }
        } else {
          fail(code, text);
        }
        break;
      }
      case 0x84: { // Clipboard
        const len = v.getUint32(o, true);
        onEnvironmentClipboard(dec.decode(new Uint8Array(buf, 1 + o + 4, len)));
        break;
      }
      case 0x83: // Cursor
        onCursor(v, o);
        break;
      case 0x87: // Pong
        onPong(v, o);
        break;
      default: // Stats: not used by this page yet
        break;
    }
  }

  // --- the guest's pointer --------------------------------------------------------------------
  // Shown as the page's own CSS cursor (its image and hotspot): it moves without the round
  // trip, and has the guest's shape (I-beam, hand, resize arrows...).
  function onCursor(v, o) {
    const c = g.cursor || (g.cursor = { x: 0, y: 0, visible: false, width: 0, height: 0, hotX: 0, hotY: 0 });
    c.x = v.getUint16(o, true);
    c.y = v.getUint16(o + 2, true);
    c.visible = v.getUint8(o + 4) === 1;
    if (v.getUint8(o + 5) === 1) {
      c.hotX = v.getUint16(o + 6, true);
      c.hotY = v.getUint16(o + 8, true);
      c.width = v.getUint16(o + 10, true);
      c.height = v.getUint16(o + 12, true);
      const n = c.width * c.height;
      if (v.byteLength < o + 14 + n * 4) return fail(2, "short cursor image");
      const img = new ImageData(Math.max(c.width, 1), Math.max(c.height, 1));
      for (let i = 0; i < n; i++) { // BGRA -> RGBA
        const p = o + 14 + i * 4;
        img.data[i * 4] = v.getUint8(p + 2);
        img.data[i * 4 + 1] = v.getUint8(p + 1);
        img.data[i * 4 + 2] = v.getUint8(p);
        img.data[i * 4 + 3] = v.getUint8(p + 3);
      }
      const tmp = document.createElement("canvas");
      tmp.width = img.width;
      tmp.height = img.height;
      tmp.getContext("2d").putImageData(img, 0, 0);
      c.url = tmp.toDataURL("image/png");
    }
    // Browsers ignore cursor images above 128 pixels: the default arrow then.
    const usable = c.url && c.width <= 128 && c.height <= 128;
    keepPointerVisible();
    canvas.style.cursor = !c.visible ? "none" : usable ? `url(${c.url}) ${c.hotX} ${c.hotY}, default` : "default";
  }

  // --- connection ----------------------------------------------------------------------------
  // A connection that ends without an error is reconnected, resuming the session (the host
  // keeps it, and the keys it holds, for resume_grace_ms), every second until that passes.
  let reconnectUntil = 0;
  function onClosed(code, reason, what) {
    if (g.state === "error") return;
    if (code) {
      releaseAll();
      fail(code, reason);
    } else if (sessionId && (g.state === "open" || g.state === "reconnecting") &&
               (g.state === "open" || performance.now() < reconnectUntil)) {
      if (g.state === "open") reconnectUntil = performance.now() + resumeGraceMs;
      g.state = "reconnecting";
      statusEl.textContent = "Reconnecting…";
      statusEl.hidden = false;
      setTimeout(reconnect, g.reconnects === 0 ? 100 : 1000);
    } else {
      releaseAll();
      g.state = "closed";
      showError("Disconnected", "The connection to the host ended. Reload the page to connect again.",
        `${what} closed ${reason || ""}`);
    }
  }

  function connectWebSocket() {
    g.transport = "websocket";
    const me = (ws = new WebSocket(`wss://${location.host}/ws`));
    let opened = false;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      opened = true;
      send(hello(Math.min(canvas.width, 65535), Math.min(canvas.height, 65535)));
    };
    ws.onmessage = (ev) => {
      const buf = ev.data;
      if (!(buf instanceof ArrayBuffer) || buf.byteLength < 1) return;
      const kind = new Uint8Array(buf, 0, 1)[0];
      if (kind === MSG_CONTROL) onControl(buf);
      else if (kind === FRAME_TYPE) onFrame(buf);
      else fail(2, `unknown message kind ${kind}`);
    };
    ws.onclose = (ev) => {
      if (ws !== me) return;
      if (!opened && g.state === "connecting") return cannotConnect(`WebSocket closed (${ev.code}) before it opened`);
      const code = ev.code >= CLOSE_CODE_BASE && ev.code < CLOSE_CODE_BASE + 1000 ? ev.code - CLOSE_CODE_BASE : 0;
      onClosed(code, ev.reason, `WebSocket (${ev.code})`);
    };
  }

  // Frames on their own streams complete out of order: hold them until their predecessor
  // was decoded; a held keyframe newer than that wins (docs/protocol.md §4).
  const heldFrames = new Map(); // sequence -> {buf, key}
  let gapSince = 0;
  function pump() {
    let best = 0;
    for (const [s, f] of heldFrames) if (f.key && s > best) best = s;
    if (best > lastSequence + 1) {
      for (const s of [...heldFrames.keys()]) if (s < best) { heldFrames.delete(s); g.framesDropped++; }
      lastSequence = best - 1;
      needKeyframe = true;
    }
    if (needKeyframe && !best) {
      for (const [s, f] of [...heldFrames]) if (!f.key) { heldFrames.delete(s); g.framesDropped++; }
    }
    while (heldFrames.has(lastSequence + 1)) {
      const f = heldFrames.get(lastSequence + 1);
      heldFrames.delete(lastSequence + 1);
      onFrame(f.buf);
    }
    for (const s of [...heldFrames.keys()]) if (s <= lastSequence) heldFrames.delete(s);
    if (heldFrames.size === 0) {
      gapSince = 0;
    } else if (!gapSince) {
      gapSince = performance.now();
    } else if (performance.now() - gapSince > KEYFRAME_REQUEST_INTERVAL_MS) {
      requestKeyframe();
    }
  }
  setInterval(() => { if (g.transport === "webtransport") pump(); }, 100);

  async function readFrameStream(stream) {
    const reader = stream.getReader();
    const parts = [];
    let len = 0;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parts.push(value);
        len += value.length;
      }
    } catch (e) {
      return; // reset by the server: a keyframe superseded it
    }
    const bytes = new Uint8Array(len);
    let o = 0;
    for (const p of parts) { bytes.set(p, o); o += p.length; }
    if (len < FRAME_HEADER_LEN || bytes[0] !== FRAME_TYPE) return fail(2, "bad frame stream");
    const v = new DataView(bytes.buffer);
    heldFrames.set(Number(v.getBigUint64(1, true)), { buf: bytes.buffer, key: bytes[17] === 1 });
    pump();
  }

  let wt = null;
  async function connectWebTransport() {
    const info = await (await fetch("/webtransport", { cache: "no-store" })).json();
    if (!info.sha256) throw new Error("the host offers no WebTransport");
    const hash = new Uint8Array(info.sha256.match(/../g).map((h) => parseInt(h, 16)));
    const me = (wt = new WebTransport(`https://${location.host}${info.path}`, {
      serverCertificateHashes: [{ algorithm: "sha-256", value: hash }],
    }));
    await Promise.race([
      wt.ready,
      new Promise((_, reject) => setTimeout(
        () => reject(Object.assign(new Error("WebTransport timed out"), { genosKind: "timeout" })), 5000)),
    ]).catch((e) => {
      // The handshake itself failed (the browser refused the host, or nobody answered).
      if (!e.genosKind && e.name === "WebTransportError") e.genosKind = "handshake";
      throw e;
    });
    const control = await wt.createBidirectionalStream();
    wtWriter = control.writable.getWriter();
    g.transport = "webtransport";
    send(hello(Math.min(canvas.width, 65535), Math.min(canvas.height, 65535)));
    wt.closed.then(
      (info) => { if (wt === me) onClosed(info.closeCode || 0, info.reason, "WebTransport"); },
      (e) => { if (wt === me) onClosed(0, e.message, "WebTransport"); },
    );
    (async () => {
      const streams = wt.incomingUnidirectionalStreams.getReader();
      for (;;) {
        const { value, done } = await streams.read();
        if (done) break;
        readFrameStream(value);
      }
    })().catch(() => {});
    // The control stream: framed messages across chunks, each handed on as [0x00, message].
    const reader = control.readable.getReader();
    let pending = new Uint8Array(0);
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        return; // the session ended: wt.closed says how
      }
      const { value, done } = chunk;
      if (done) break;
      const joined = new Uint8Array(pending.length + value.length);
      joined.set(pending);
      joined.set(value, pending.length);
      let o = 0;
      while (joined.length - o >= 4) {
        const n = new DataView(joined.buffer, o).getUint32(0, true);
        if (n > 1 << 20) return fail(2, "control message too long");
        if (joined.length - o < 4 + n) break;
        const m = new Uint8Array(5 + n);
        m.set(joined.subarray(o, o + 4 + n), 1);
        onControl(m.buffer);
        o += 4 + n;
      }
      pending = joined.slice(o);
    }
  }

  function reconnect() {
    g.reconnects++;
    ws = null;
    wt = null;
    wtWriter = null;
    heldFrames.clear();
    lastSequence = 0;
    needKeyframe = true;
    connect(g.transport);
  }

  // Test hook: drop the connection as a network would (the page then resumes the session).
  g.dropConnection = () => {
    if (ws) ws.close();
    if (wt) wt.close();
  };

  // The first connection failed on every transport tried. A WebTransport handshake the browser
  // refused (as it refuses a certificate whose hash is not the one the host announced), with no
  // WebSocket to fall back on, is a certificate page; anything else, a host that cannot be
  // reached. (Browsers do not say why a handshake failed: a certificate is the likely cause
  // when the host answered HTTPS a moment ago.)
  let wtFailure = null; // {kind: "handshake" | "timeout" | "unavailable", message}
  function cannotConnect(why) {
    if (g.state !== "connecting") return;
    const wtWhy = wtFailure ? `WebTransport: ${wtFailure.message}; ` : "";
    if (wtFailure && wtFailure.kind === "handshake") {
      g.error = { code: 0, name: "CertificateMismatch", message: `${wtWhy}${why}` };
      return showError("The host's certificate did not match",
        "The browser refused the certificate the host presented for WebTransport: it is not the one the host " +
        "announced for this page. Something between you and the host may be intercepting the connection, or the " +
        "host's certificate changed just now. Reload the page; if this persists, tell the host's operator.",
        `CertificateMismatch: ${wtWhy}${why}`);
    }
    g.error = { code: 0, name: "Unreachable", message: `${wtWhy}${why}` };
    showError("The host cannot be reached",
      "The page loaded, but the browser could not open a connection to the host's stream. " +
      "Check the network (UDP and WebSocket traffic to this port) and reload the page.",
      `Unreachable: ${wtWhy}${why}`);
  }

  function connect(again) {
    fitCanvas();
    newDecoder();
    const want = again || params.get("transport");
    if (want === "websocket" || (typeof WebTransport === "undefined" && want !== "webtransport")) {
      return connectWebSocket();
    }
    connectWebTransport().catch((e) => {
      g.notices.push(`WebTransport: ${e.message}`);
      if (g.state === "reconnecting") return onClosed(0, e.message, "WebTransport"); // again
      if (g.state !== "connecting") return;
      const kind = e.genosKind || "unavailable";
      wtFailure = { kind, message: e.message };
      if (want === "webtransport") return cannotConnect("the link asks for WebTransport only");
      if (wt) try { wt.close(); } catch (_) { /* already closed */ }
      wt = null;
      wtWriter = null;
      connectWebSocket();
    });
  }
  setInterval(() => { if (g.state === "open") send(pingMsg()); }, 5000);

  // --- statistics: every 2 s to the host (Stats), once a second in genos.stats and, on
  // demand, in an overlay (`#...&stats=1` in the link, or genos.toggleStats()).
  let statBytes = 0;
  let statDecoded = 0;
  let statDecodeMs = [];
  let statLatencyMs = [];
  let clockOffsetUs = null; // server clock minus page clock, from the best Ping round trip
  let bestRttUs = Infinity;
  const statsEl = document.getElementById("stats");
  statsEl.hidden = params.get("stats") !== "1";
  g.toggleStats = () => { statsEl.hidden = !statsEl.hidden; };
  function onPong(v, o) {
    const sentUs = Number(v.getBigUint64(o, true));
    const serverUs = Number(v.getBigUint64(o + 8, true));
    const now = nowUs();
    const rtt = now - sentUs;
    if (rtt >= 0 && rtt <= bestRttUs) {
      bestRttUs = rtt;
      clockOffsetUs = serverUs - (sentUs + now) / 2;
      g.clockOffsetUs = clockOffsetUs;
    }
  }
  // Each decoded frame's decode time and latency (null while unknown), for the overlay (1 s
  // windows), the report to the host (2 s windows) and a recording, if one runs.
  let reportDecodeMs = [];
  let reportLatencyMs = [];
  let recording = null;
  function recordFrame(decodeMs, latencyMs, drawMs, captureUs) {
    if (decodeMs !== null) { statDecodeMs.push(decodeMs); reportDecodeMs.push(decodeMs); }
    if (latencyMs !== null) { statLatencyMs.push(latencyMs); reportLatencyMs.push(latencyMs); }
    if (!recording) return;
    const r = recording;
    const now = performance.now();
    if (r.skip > 0) {
      r.skip--; // warm-up: not recorded
      if (r.skip === 0) r.since = now;
      return;
    }
    r.frames++;
    if (r.firstMs === null) r.firstMs = now;
    r.lastMs = now;
    if (decodeMs !== null) r.decodeMs.push(decodeMs);
    r.drawMs.push(drawMs);
    if (latencyMs === null) return;
    r.latencyMs.push(latencyMs);
    // Capture to handed to the decoder: the host's encoding, the transport, the page's queue.
    if (decodeMs !== null) r.transitMs.push(latencyMs - decodeMs - drawMs);
    // When the page's next rendering update begins (the canvas goes to the compositor in it).
    requestAnimationFrame(() => {
      if (recording === r) r.nextFrameMs.push((nowUs() - clockOffsetUs - captureUs) / 1000);
    });
  }
  // A recording of every decoded frame's decode time and latency, for benchmarks
  // (hostd/examples/web_bench.rs). genos.startRecording(skip) starts it, the first `skip`
  // frames decoded from then on not recorded (a warm-up); genos.recordingStatus() is
  // {started, frames} (started: the warm-up is over); genos.stopRecording() ends it and
  // returns {frames, seconds (since the warm-up ended), spanMs (first to last recorded frame),
  // dropped, decodeErrors, and per frame decodeMs, drawMs (drawImage), latencyMs, transitMs
  // (capture to handed to the decoder) and nextFrameMs (capture to the page's next animation
  // frame after the paint)}.
  g.startRecording = (skip = 0) => {
    recording = {
      skip, frames: 0, since: skip > 0 ? null : performance.now(), firstMs: null, lastMs: null,
      dropped: g.framesDropped, decodeErrors: g.decodeErrors, decodeMs: [], drawMs: [], latencyMs: [], transitMs: [],
      nextFrameMs: [],
    };
  };
  g.recordingStatus = () => recording && { started: recording.since !== null, frames: recording.frames };
  g.stopRecording = () => {
    const r = recording;
    recording = null;
    if (!r) return null;
    const { since, firstMs, lastMs, skip, ...rest } = r;
    return {
      ...rest,
      seconds: since === null ? 0 : (performance.now() - since) / 1000,
      spanMs: firstMs === null ? 0 : lastMs - firstMs,
      dropped: g.framesDropped - r.dropped,
      decodeErrors: g.decodeErrors - r.decodeErrors,
    };
  };

  const median = (a) => {
    if (!a.length) return null;
    const b = [...a].sort((x, y) => x - y);
    return b[Math.floor(b.length / 2)];
  };
  // The report to the host (Stats, docs/protocol.md), every 2 s while the page decodes, as
  // genos-view's: running totals and the medians over the last 2 s.
  const us = (ms) => (ms === null ? 0 : Math.max(0, Math.min(0xffffffff, Math.round(ms * 1000))));
  setInterval(() => {
    const decode = median(reportDecodeMs);
    const latency = median(reportLatencyMs);
    reportDecodeMs = [];
    reportLatencyMs = [];
    if (g.state !== "open" || decode === null) return;
    g.reportsSent++;
    send(message(0x0a, 24, (v, o) => {
      v.setBigUint64(o, BigInt(g.framesDecoded), true);
      v.setBigUint64(o + 8, BigInt(g.framesDropped), true);
      v.setUint32(o + 16, us(decode), true);
      v.setUint32(o + 20, us(latency), true);
    }));
  }, 2000);
  setInterval(() => {
    if (g.state !== "open") return;
    const decode = median(statDecodeMs);
    const latency = median(statLatencyMs);
    g.stats = {
      fps: g.framesDecoded - statDecoded,
      bitrateKbps: Math.round((statBytes * 8) / 1000),
      decodeMs: decode,
      latencyMs: latency,
      rttMs: bestRttUs === Infinity ? null : bestRttUs / 1000,
      width: g.width,
      height: g.height,
      transport: g.transport,
    };
    statDecoded = g.framesDecoded;
    statBytes = 0;
    statDecodeMs = [];
    statLatencyMs = [];
    if (!statsEl.hidden) {
      const f = (x, d) => (x === null ? "–" : x.toFixed(d));
      statsEl.textContent = `${g.stats.fps} fps · ${g.stats.bitrateKbps} kbit/s · decode ${f(decode, 1)} ms · ` +
        `latency ${f(latency, 0)} ms · ${g.width}×${g.height} · ${g.transport}`;
    }
  }, 1000);

  // --- input ---------------------------------------------------------------------------------
  const held = new Set();
  const releaseOnReconnect = new Set();
  function releaseAll() {
    for (const code of held) {
      if (g.state === "open") send(keyMsg(code, false));
      else releaseOnReconnect.add(code);
    }
    held.clear();
  }
  // A paste shortcut (Ctrl+V, Cmd+V, Shift+Insert) is let through to the browser so that
  // its paste event hands the page the host's clipboard; the key goes to the guest right
  // after that text (or after 100 ms without a paste).
  let pendingPasteKey = null;
  function flushPasteKey() {
    if (pendingPasteKey === null) return;
    const code = pendingPasteKey;
    pendingPasteKey = null;
    sendInput(keyMsg(code, true));
  }
  const isPaste = (e) =>
    ((e.ctrlKey || e.metaKey) && e.code === "KeyV") || (e.shiftKey && e.code === "Insert");
  function onKey(e, pressed) {
    if (pasteBox.contains(e.target)) return; // typing into the paste box
    if (pressed && (e.isComposing || e.keyCode === 229)) return; // the IME's: its text comes at its end
    const code = GENOS_KEYMAP[e.code];
    if (code === undefined) return;
    const paste = pressed && isPaste(e) && canClipboard();
    if (!paste) e.preventDefault();
    if (pressed && e.repeat) return; // the guest repeats keys itself
    if (pressed) held.add(code); else if (!held.delete(code)) return;
    if (paste) {
      flushPasteKey();
      pendingPasteKey = code;
      setTimeout(flushPasteKey, 100);
      return;
    }
    if (!pressed && pendingPasteKey === code) flushPasteKey();
    if (!pressed && !MODIFIERS.has(code) && latched.size && g.state === "open") {
      sendInput(keyMsg(code, false));
      releaseLatched(); // a sticky modifier from the overlay combines with one key
      return;
    }
    if (!pressed && g.state === "reconnecting") {
      releaseOnReconnect.add(code); // the resumed session still holds it down
      return;
    }
    sendInput(keyMsg(code, pressed));
  }

  // --- screen wake lock: the screen stays on while the session is open and the page shows --
  let wakeLock = null;
  function holdWakeLock() {
    if (g.state !== "open" || document.visibilityState !== "visible" || wakeLock) return;
    if (!navigator.wakeLock) return void (g.wakeLock = "unsupported");
    navigator.wakeLock.request("screen").then(
      (lock) => {
        wakeLock = lock;
        g.wakeLock = "held";
        // Released by the browser when the page is hidden; taken again when it shows.
        lock.addEventListener("release", () => { wakeLock = null; g.wakeLock = "released"; });
      },
      (e) => { g.wakeLock = `refused: ${e.message}`; },
    );
  }
  document.addEventListener("visibilitychange", holdWakeLock);

  // --- the overlay bar on touch devices -------------------------------------------------------
  // Keys a phone has not (Esc, Tab, arrows, F1-F12, Ctrl+Alt+Del), sticky modifiers (tap Ctrl,
  // then a key: Ctrl+key), the on-screen keyboard, Paste, fullscreen and disconnect. It keeps
  // off the guest's pointer (keepPointerVisible).
  const MODIFIERS = new Set([K.ControlLeft, K.ControlRight, K.ShiftLeft, K.ShiftRight, K.AltLeft, K.AltRight,
    K.MetaLeft, K.MetaRight]);
  const latched = new Set();
  const overlay = document.getElementById("overlay");
  const osk = document.getElementById("osk");
  overlay.hidden = !(navigator.maxTouchPoints > 0 || matchMedia("(pointer: coarse)").matches);
  g.overlay = !overlay.hidden;
  function showLatched() {
    for (const b of overlay.querySelectorAll("[data-mod]")) {
      b.classList.toggle("latched", latched.has(GENOS_KEYMAP[b.dataset.mod]));
    }
  }
  function releaseLatched() {
    for (const c of latched) sendInput(keyMsg(c, false));
    latched.clear();
    showLatched();
  }
  function tapKey(code) {
    sendInput(keyMsg(code, true));
    sendInput(keyMsg(code, false));
    releaseLatched();
  }
  overlay.addEventListener("pointerdown", (e) => {
    if (e.target !== osk) e.preventDefault(); // keep the on-screen keyboard's focus
  });
  overlay.addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    if (b.dataset.key) return tapKey(GENOS_KEYMAP[b.dataset.key]);
    if (b.dataset.mod) {
      const code = GENOS_KEYMAP[b.dataset.mod];
      if (latched.delete(code)) sendInput(keyMsg(code, false));
      else { latched.add(code); sendInput(keyMsg(code, true)); }
      return showLatched();
    }
    switch (b.dataset.action) {
      case "cad":
        for (const c of [K.ControlLeft, K.AltLeft, K.Delete]) sendInput(keyMsg(c, true));
        for (const c of [K.Delete, K.AltLeft, K.ControlLeft]) sendInput(keyMsg(c, false));
        latched.clear();
        showLatched();
        break;
      case "fkeys": { // F1-F12 in a row of their own, shown on demand
        const fkeys = document.getElementById("fkeys");
        fkeys.hidden = !fkeys.hidden;
        b.classList.toggle("latched", !fkeys.hidden);
        b.setAttribute("aria-expanded", String(!fkeys.hidden));
        keepPointerVisible();
        break;
      }
      case "expand":
        overlay.classList.remove("collapsed");
        g.overlayEdge = overlay.classList.contains("top") ? "top" : "bottom";
        if (g.cursor) overlayShownAt = `${g.cursor.x},${g.cursor.y}`;
        break;
      case "paste":
        pasteFromBrowser();
        break;
      case "keyboard":
        resetOsk();
        osk.focus();
        break;
      case "trackpad":
        trackpad = g.trackpad = !trackpad;
        b.classList.toggle("latched", trackpad);
        break;
      case "fullscreen":
        if (document.fullscreenElement) document.exitFullscreen();
        else document.documentElement.requestFullscreen().then(
          // In fullscreen, shortcuts the browser would take (Ctrl+W, Alt+Tab...) go to the guest.
          () => navigator.keyboard && navigator.keyboard.lock && navigator.keyboard.lock().catch(() => {}),
          () => {},
        );
        break;
      case "disconnect":
        releaseAll();
        g.sessionId = null;
        storeSession([]); // left on purpose: a reload starts afresh
        showError("Disconnected", "You left the session. Reload the page to connect again.");
        if (ws) ws.close();
        if (wt) wt.close();
        break;
    }
  });
  // Text from the on-screen keyboard or an IME: characters a US layout has are typed as key
  // presses (Shift for capitals and symbols); a run of others (é, ß, 日本, emoji) goes
  // through the environment's clipboard and Ctrl+V pastes it. A composition (IME, or a
  // phone keyboard composing a word) is sent once, when it ends, as what it committed.
  const SHIFTED = { "~": "`", "!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8",
    "(": "9", ")": "0", "_": "-", "+": "=", "{": "[", "}": "]", "|": "\\", ":": ";", "\"": "'", "<": ",",
    ">": ".", "?": "/" };
  const CODE_OF = { "`": "Backquote", "-": "Minus", "=": "Equal", "[": "BracketLeft", "]": "BracketRight",
    "\\": "Backslash", ";": "Semicolon", "'": "Quote", ",": "Comma", ".": "Period", "/": "Slash", " ": "Space",
    "\n": "Enter", "\t": "Tab" };
  // [evdev code, shifted] of a character on a US layout, or null.
  function keyOf(ch) {
    let shift = false;
    let base = ch;
    if (SHIFTED[ch]) { shift = true; base = SHIFTED[ch]; }
    else if (ch >= "A" && ch <= "Z") { shift = true; base = ch.toLowerCase(); }
    let code;
    if (base >= "a" && base <= "z") code = K["Key" + base.toUpperCase()];
    else if (base >= "0" && base <= "9") code = K["Digit" + base];
    else code = K[CODE_OF[base]];
    return code === undefined ? null : [code, shift];
  }
  function typeKey([code, shift]) {
    if (shift) sendInput(keyMsg(K.ShiftLeft, true));
    sendInput(keyMsg(code, true));
    sendInput(keyMsg(code, false));
    if (shift) sendInput(keyMsg(K.ShiftLeft, false));
  }
  function pasteText(text) {
    if (!sendClipboard(text)) {
      g.notices.push(`not sent: ${JSON.stringify(text.slice(0, 40))} (no clipboard right, or too long)`);
      return;
    }
    g.textPasted++;
    sendInput(keyMsg(K.ControlLeft, true));
    sendInput(keyMsg(K.KeyV, true));
    sendInput(keyMsg(K.KeyV, false));
    sendInput(keyMsg(K.ControlLeft, false));
  }
  function sendText(text) {
    let run = ""; // characters without a key, pasted together
    for (const ch of text.replace(/\r\n?/g, "\n")) {
      const k = keyOf(ch);
      if (!k) { run += ch; continue; }
      if (run) pasteText(run);
      run = "";
      typeKey(k);
    }
    if (run) pasteText(run);
    releaseLatched();
  }
  g.textPasted = 0;
  // The field keeps one space before the caret: a phone keyboard sends Backspace on an empty
  // field to nobody.
  function resetOsk() {
    osk.value = " ";
    osk.setSelectionRange(1, 1);
  }
  let composing = false;
  osk.addEventListener("compositionstart", () => { composing = true; });
  osk.addEventListener("compositionend", (e) => {
    composing = false;
    sendText(e.data || "");
    resetOsk();
  });
  osk.addEventListener("input", (e) => {
    // Composition steps are the composition's: its end sends the text (Safari's
    // insertFromComposition after compositionend included).
    if (composing || e.isComposing || /Composition/.test(e.inputType || "")) return;
    if (e.inputType === "deleteContentBackward") tapKey(K.Backspace);
    else if (e.inputType === "insertLineBreak" || e.inputType === "insertParagraph") tapKey(K.Enter);
    else sendText(e.data || "");
    resetOsk();
  });
  // The overlay never covers the guest's pointer: when the pointer (its image, as the page
  // draws it) is under the bar, the bar moves to the other edge and stays there until the
  // pointer comes under it again; when it would cover the pointer at either edge it collapses
  // to a handle in a corner (tapping it shows the bar until the pointer moves).
  let overlayShownAt = null; // the pointer position when the handle was tapped
  function keepPointerVisible() {
    if (overlay.hidden || !g.cursor || !g.height) return;
    const c = g.cursor;
    if (overlayShownAt === `${c.x},${c.y}`) return;
    overlayShownAt = null;
    const [, y] = pageOfStream(c.x, c.y);
    const above = c.hotY || 0;
    const below = Math.max((c.height || 1) - above, 1);
    const covers = () => {
      const bar = overlay.getBoundingClientRect();
      return c.visible && y + below >= bar.top && y - above <= bar.bottom;
    };
    overlay.classList.remove("collapsed");
    if (covers()) {
      overlay.classList.toggle("top");
      if (covers()) {
        overlay.classList.toggle("top");
        overlay.classList.add("collapsed");
      }
    }
    g.overlayEdge = overlay.classList.contains("collapsed") ? "collapsed"
      : overlay.classList.contains("top") ? "top" : "bottom";
  }
  window.addEventListener("resize", keepPointerVisible);

  // --- clipboard (docs/protocol.md §11) ------------------------------------------------------
  const MAX_CLIPBOARD = 256 * 1024;
  let clipboardShared = null; // the text both sides hold: never sent back, never taken again
  let clipboardStopped = false;
  const canClipboard = () => g.state === "open" && (g.rights & 4) !== 0 && !clipboardStopped;
  // Puts `text` on the environment's clipboard; true when the environment holds it.
  function sendClipboard(text) {
    if (!canClipboard() || !text) return false;
    if (text === clipboardShared) return true;
    const bytes = enc.encode(text);
    if (bytes.length > MAX_CLIPBOARD) {
      g.notices.push("clipboard: text above 256 KiB not sent");
      return false;
    }
    clipboardShared = text;
    g.clipboardSent++;
    send(message(0x08, 4 + bytes.length, (v, o, b) => {
      v.setUint32(o, bytes.length, true);
      b.set(bytes, o + 4);
    }));
    return true;
  }
  document.addEventListener("paste", (e) => {
    if (pasteBox.contains(e.target)) return; // into the paste box's field
    const text = e.clipboardData ? e.clipboardData.getData("text/plain") : "";
    e.preventDefault();
    sendClipboard(text);
    flushPasteKey();
  });
  // What the host's clipboard holds when the page gets focus, where the browser lets us read.
  function readHostClipboard() {
    if (!canClipboard() || !navigator.clipboard || !navigator.clipboard.readText) return;
    navigator.clipboard.readText().then(sendClipboard, () => {});
  }
  window.addEventListener("focus", readHostClipboard);
  function onEnvironmentClipboard(text) {
    if (text === clipboardShared) return;
    clipboardShared = text;
    g.clipboard = text;
    if (!navigator.clipboard || !navigator.clipboard.writeText) return showEnvironmentClipboard(true);
    navigator.clipboard.writeText(text).then(() => showEnvironmentClipboard(false), (e) => {
      g.notices.push(`clipboard: ${e.message}`);
      showEnvironmentClipboard(true);
    });
  }

  // The overlay's Paste button: the browser's clipboard where the page may read it, pasted
  // into the guest (Clipboard, then Ctrl+V); where it may not (permission denied, no API), a
  // paste box: the person pastes the text there and sends it. The box also shows the
  // environment's clipboard when the page could not put it on the browser's.
  const pasteButton = overlay.querySelector("[data-action=paste]");
  const pasteBox = document.getElementById("paste");
  const pasteArea = document.getElementById("paste-text");
  let environmentClipboardStuck = false; // the browser refused the environment's text
  function showEnvironmentClipboard(stuck) {
    environmentClipboardStuck = stuck;
    document.getElementById("paste-from-box").hidden = !stuck;
    document.getElementById("paste-from").value = stuck ? g.clipboard || "" : "";
  }
  function openPasteBox(why) {
    g.pasteBox = why;
    pasteArea.value = "";
    showEnvironmentClipboard(environmentClipboardStuck);
    pasteBox.hidden = false;
    pasteArea.focus();
  }
  function pasteFromBrowser() {
    if (!canClipboard()) return;
    if (!navigator.clipboard || !navigator.clipboard.readText) return openPasteBox("no clipboard API");
    navigator.clipboard.readText().then(
      (text) => (text ? pasteText(text) : openPasteBox("the clipboard is empty")),
      (e) => openPasteBox(e.message || String(e)),
    );
  }
  pasteBox.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { pasteBox.hidden = true; canvas.focus(); }
  });
  pasteBox.addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    const text = pasteArea.value;
    if (b.dataset.paste === "paste" && text) pasteText(text);
    else if (b.dataset.paste === "send" && text) sendClipboard(text);
    pasteBox.hidden = true;
    canvas.focus();
  });
  window.addEventListener("keydown", (e) => onKey(e, true));
  window.addEventListener("keyup", (e) => onKey(e, false));
  window.addEventListener("blur", releaseAll);
  // Going away (a reload, a closed tab): what the session holds is kept for the reload.
  window.addEventListener("pagehide", () => { if (g.state === "open") storeSession(held); });

  // Stream pixel <-> page (CSS pixels), through the letterbox and the view's zoom (the
  // canvas's transform: its bounding box is where it is drawn).
  function pageOfStream(x, y) {
    const b = canvas.getBoundingClientRect();
    const k = b.width / canvas.width; // page pixels per canvas pixel
    return [b.left + (rect.x + (x * rect.w) / g.width) * k, b.top + (rect.y + (y * rect.h) / g.height) * k];
  }
  function streamPoint(e) {
    const bounds = canvas.getBoundingClientRect();
    const k = canvas.width / bounds.width; // canvas pixels per page pixel
    const px = (e.clientX - bounds.left) * k;
    const py = (e.clientY - bounds.top) * k;
    const x = Math.round(((px - rect.x) * g.width) / rect.w);
    const y = Math.round(((py - rect.y) * g.height) / rect.h);
    return [Math.min(Math.max(x, 0), Math.max(g.width - 1, 0)), Math.min(Math.max(y, 0), Math.max(g.height - 1, 0))];
  }
  // DOM button numbers -> protocol buttons (1 left, 2 middle, 3 right, 4 back, 5 forward).
  const BUTTONS = { 0: 1, 1: 2, 2: 3, 3: 4, 4: 5 };
  // Touch goes to the guest's touchscreen as contacts (slots 0..9), mouse and pen as the
  // absolute pointer with buttons.
  const touchMsg = (id, phase, x, y) =>
    message(0x14, 6, (v, o) => {
      v.setUint8(o, id);
      v.setUint8(o + 1, phase);
      v.setUint16(o + 2, x, true);
      v.setUint16(o + 4, y, true);
    });
  const TOUCH_START = 0, TOUCH_MOVE = 1, TOUCH_END = 2, TOUCH_CANCEL = 3;
  const touchSlots = new Map(); // pointerId -> slot
  // Trackpad mode (the overlay's Pad button, or `#...&trackpad=1`): the screen is a laptop's
  // touchpad. One finger moves the pointer (relative), a tap clicks, a long press or a
  // two-finger tap right-clicks, two fingers dragged scroll.
  let trackpad = params.get("trackpad") === "1";
  g.trackpad = trackpad;
  const pad = { fingers: new Map(), start: 0, moved: 0, maxFingers: 0, pointer: null, longPress: 0, two: null };
  const TAP_MS = 250, TAP_SLOP = 10, LONG_PRESS_MS = 500, PINCH_SLOP = 16, SCROLL_SLOP = 8;
  // The local view: the canvas zoomed by `scale` about its top-left corner and moved by
  // (x, y) CSS pixels (a CSS transform; the guest is not told). Pointer and touch positions
  // are mapped back through it (streamPoint), so a tap hits the guest pixel under the finger.
  const view = (g.zoom = { scale: 1, x: 0, y: 0 });
  const MAX_ZOOM = 8;
  function setView(scale, x, y) {
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    view.scale = scale < 1.05 ? 1 : Math.min(scale, MAX_ZOOM);
    // The zoomed canvas always covers the viewport.
    view.x = Math.min(0, Math.max(x, w - view.scale * w));
    view.y = Math.min(0, Math.max(y, h - view.scale * h));
    canvas.style.transform = view.scale === 1 ? "" : `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
    keepPointerVisible();
  }
  window.addEventListener("resize", () => setView(view.scale, view.x, view.y));
  // While zoomed, the view follows the trackpad's pointer when it leaves it.
  function followPointer(p) {
    if (view.scale === 1) return;
    const [px, py] = pageOfStream(p[0], p[1]);
    const margin = 24;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    const dx = px < margin ? margin - px : px > w - margin ? w - margin - px : 0;
    const dy = py < margin ? margin - py : py > h - margin ? h - margin - py : 0;
    if (dx || dy) setView(view.scale, view.x + dx, view.y + dy);
  }
  // Two fingers: their midpoint and distance, and the view when they came down.
  function twoFingers() {
    const [a, b] = [...pad.fingers.values()];
    return { mx: (a[0] + b[0]) / 2, my: (a[1] + b[1]) / 2, d: Math.hypot(a[0] - b[0], a[1] - b[1]) };
  }
  function padPointer() {
    if (!pad.pointer) pad.pointer = g.cursor ? [g.cursor.x, g.cursor.y] : [g.width >> 1, g.height >> 1];
    return pad.pointer;
  }
  function click(button) {
    sendInput(buttonMsg(button, true));
    sendInput(buttonMsg(button, false));
  }
  function padTouch(e, phase) {
    e.preventDefault();
    const now = performance.now();
    const dpr = window.devicePixelRatio || 1;
    const scale = (g.width / rect.w) * dpr; // stream pixels per CSS pixel
    if (phase === TOUCH_START) {
      if (pad.fingers.size === 0) {
        pad.start = now;
        pad.moved = 0;
        pad.maxFingers = 0;
        clearTimeout(pad.longPress);
        pad.longPress = setTimeout(() => {
          if (pad.fingers.size === 1 && pad.moved < TAP_SLOP) { click(3); pad.maxFingers = 99; }
        }, LONG_PRESS_MS);
      }
      pad.fingers.set(e.pointerId, [e.clientX, e.clientY]);
      pad.maxFingers = Math.max(pad.maxFingers, pad.fingers.size);
      // A second finger starts a gesture that becomes a scroll or a pinch once it moved.
      pad.two = pad.fingers.size === 2
        ? { ...twoFingers(), kind: null, scale: view.scale, x: view.x, y: view.y, wx: 0, wy: 0 }
        : null;
      canvas.setPointerCapture(e.pointerId);
      return;
    }
    const last = pad.fingers.get(e.pointerId);
    if (!last) return;
    const dx = e.clientX - last[0];
    const dy = e.clientY - last[1];
    pad.fingers.set(e.pointerId, [e.clientX, e.clientY]);
    if (phase === TOUCH_MOVE) {
      pad.moved += Math.abs(dx) + Math.abs(dy);
      if (pad.fingers.size === 1 && pad.maxFingers === 1) {
        // The pointer moves with the finger over the picture as shown (zoomed or not).
        const p = padPointer();
        p[0] = Math.min(Math.max(p[0] + (dx * scale) / view.scale, 0), g.width - 1);
        p[1] = Math.min(Math.max(p[1] + (dy * scale) / view.scale, 0), g.height - 1);
        sendInput(moveMsg(Math.round(p[0]), Math.round(p[1])));
        followPointer(p);
      } else if (pad.fingers.size === 2 && pad.two) {
        const t = pad.two;
        const now2 = twoFingers();
        if (!t.kind && Math.abs(now2.d - t.d) >= PINCH_SLOP) t.kind = "pinch";
        else if (!t.kind && Math.hypot(now2.mx - t.mx, now2.my - t.my) >= SCROLL_SLOP) t.kind = "scroll";
        if (t.kind === "pinch") {
          // Pinch: zoom the view; the picture point under the fingers' first midpoint
          // follows their midpoint (zoom and pan in one).
          const scale2 = Math.min(Math.max((t.scale * now2.d) / Math.max(t.d, 1), 1), MAX_ZOOM);
          const cx = (t.mx - t.x) / t.scale;
          const cy = (t.my - t.y) / t.scale;
          setView(scale2, now2.mx - scale2 * cx, now2.my - scale2 * cy);
        } else if (t.kind === "scroll") {
          // Scroll: content follows the fingers (natural scrolling), 1 CSS px of their
          // midpoint's movement since they came down = 1.2/120 notch.
          const clamp = (n) => Math.max(-32768, Math.min(32767, n));
          const wx = Math.round(-(now2.mx - t.mx) * 1.2);
          const wy = Math.round(-(now2.my - t.my) * 1.2);
          if (wx !== t.wx || wy !== t.wy) sendInput(wheelMsg(clamp(wx - t.wx), clamp(wy - t.wy)));
          t.wx = wx;
          t.wy = wy;
        }
      }
      return;
    }
    pad.fingers.delete(e.pointerId);
    pad.two = null;
    if (pad.fingers.size > 0) return;
    clearTimeout(pad.longPress);
    const tap = now - pad.start < TAP_MS && pad.moved < TAP_SLOP;
    if (tap && pad.maxFingers === 1) click(1);
    else if (tap && pad.maxFingers === 2) click(3);
  }
  function touch(e, phase) {
    if (trackpad) return padTouch(e, phase);
    e.preventDefault();
    let slot = touchSlots.get(e.pointerId);
    if (phase === TOUCH_START) {
      if (slot !== undefined) return;
      for (slot = 0; slot < 10 && [...touchSlots.values()].includes(slot); slot++);
      if (slot === 10) return; // more fingers than the touchscreen has slots
      touchSlots.set(e.pointerId, slot);
      canvas.setPointerCapture(e.pointerId);
    } else if (slot === undefined) {
      return;
    }
    if (phase === TOUCH_END || phase === TOUCH_CANCEL) touchSlots.delete(e.pointerId);
    const [x, y] = streamPoint(e);
    sendInput(touchMsg(slot, phase, x, y));
  }
  canvas.addEventListener("pointermove", (e) => {
    if (e.pointerType === "touch") return touch(e, TOUCH_MOVE);
    const [x, y] = streamPoint(e);
    sendInput(moveMsg(x, y));
  });
  canvas.addEventListener("pointerdown", (e) => {
    if (e.pointerType === "touch") return touch(e, TOUCH_START);
    const b = BUTTONS[e.button];
    if (b === undefined) return;
    e.preventDefault();
    canvas.focus();
    canvas.setPointerCapture(e.pointerId);
    const [x, y] = streamPoint(e);
    sendInput(moveMsg(x, y));
    sendInput(buttonMsg(b, true));
  });
  canvas.addEventListener("pointerup", (e) => {
    if (e.pointerType === "touch") return touch(e, TOUCH_END);
    const b = BUTTONS[e.button];
    if (b === undefined) return;
    e.preventDefault();
    sendInput(buttonMsg(b, false));
  });
  canvas.addEventListener("pointercancel", (e) => {
    if (e.pointerType === "touch") touch(e, TOUCH_CANCEL);
  });
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    // 1/120 of a notch; a pixel delta of 100 (Chromium's notch) is one notch.
    const unit = e.deltaMode === 1 ? 40 : e.deltaMode === 2 ? 120 * 3 : 1.2;
    const clamp = (n) => Math.max(-32768, Math.min(32767, Math.round(n * unit)));
    const dx = clamp(e.deltaX);
    const dy = clamp(e.deltaY);
    if (dx || dy) sendInput(wheelMsg(dx, dy));
  }, { passive: false });

  connect();
})();
