// rtcrelay demo call: one WebRTC call to the echo transceiver, through the relay.
//
// Signalling is WHIP-style: POST the SDP offer (Content-Type: application/sdp) to the
// signalling URL from ./config.json -> 201 Created, the SDP answer, and a Location for the
// session; DELETE that Location hangs up. No STUN/TURN (iceServers: []): the transceiver's
// only candidate is the relay's address and it ignores the browser's candidates, so the
// offer is sent once, after ICE gathering (no trickle). The call itself (offer, answer,
// calling again when it is lost, moving when its transceiver drains) is RtcrelayCall in
// rtcrelay-call.js; this file is the page around it.
//
// Test hooks:
//   window.__call()    -> Promise: resolves once the answer is applied (not yet connected)
//   window.__hangup()  -> Promise: DELETE the session, close the connection
//   window.__result    -> live snapshot (see `result` below), updated every 500 ms
//   window.__restartIce() -> Promise: WHIP PATCH with new ICE credentials
//   window.__audioPackets() -> Promise: audio packets received by the current call (getStats)
"use strict";

(function () {
  const STATS_INTERVAL_MS = 500;
  const PING_INTERVAL_MS = 1000;

  const result = {
    phase: "idle",               // idle (loading) | ready | calling | in call | ended | error
    connectionState: "new",
    iceConnectionState: "new",
    iceGatheringState: "new",
    signalingState: null,
    sessionUrl: null,
    dataChannelState: null,
    dataChannelEcho: null,       // text of the first message echoed back
    echoRttMs: null,             // round trip of the latest echoed ping
    echoCount: 0,
    pingsSent: 0,
    iceRestarts: 0,              // window.__restartIce() done
    reconnects: 0,               // calls made again after a failure (kept across calls)
    migrations: 0,               // moves to another transceiver on its request (drain)
    migratedAtMs: null,          // performance.now() of the last move
    failedAtMs: null,            // performance.now() when the last call failed
    connectedAtMs: null,         // performance.now() when the current call connected
    dtlsState: null,             // transport stats: a new DTLS handshake would show here
    pairChanges: 0,
    srtpCipher: null,
    inboundPackets: 0,           // inbound-rtp audio packetsReceived
    inboundBytes: 0,
    inboundPacketsLost: 0,
    jitterMs: null,
    totalAudioEnergy: 0,
    audioLevel: 0,
    outboundPackets: 0,
    outboundBytes: 0,
    codec: null,
    rttMs: null,                 // selected candidate pair's currentRoundTripTime
    selectedPair: { local: null, remote: null, localType: null, remoteType: null },
    setupMs: null,               // Call -> connected
    serverUfrag: null,           // the answer's ice-ufrag: the relay's route token
    hangupStatus: null,          // HTTP status of the DELETE
    config: null,
    error: null,
  };
  window.__result = result;
  window.__sdp = { offer: null, answer: null };  // the last call's SDP, for debugging

  let config = null;
  let configPromise = null;
  let client = null;       // the RtcrelayCall (rtcrelay-call.js)
  let pc = null;           // its current connection
  let dc = null;           // that connection's "echo" channel
  const echoChannels = new WeakMap();  // connection -> its "echo" channel
  let localStream = null;
  let statsTimer = null;
  let pingTimer = null;
  let pingSeq = 0;
  let sessionEtag = null;  // the session's ETag (WHIP: a PATCH names it)
  let callStarted = 0;

  const $ = (id) => document.getElementById(id);

  function log(message) {
    const li = document.createElement("li");
    const t = new Date().toLocaleTimeString();
    li.textContent = `${t}  ${message}`;
    const list = $("log");
    list.appendChild(li);
    while (list.children.length > 60) list.removeChild(list.firstChild);
    list.scrollTop = list.scrollHeight;
    console.log("[call] " + message);
  }

  function setError(err) {
    const text = err instanceof Error ? err.message : String(err);
    result.error = text;
    result.phase = "error";
    log("error: " + text);
    render();
  }

  function withTimeout(promise, ms, what) {
    let timer;
    return Promise.race([
      promise,
      new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no answer after ${ms} ms`)), ms); }),
    ]).finally(() => clearTimeout(timer));
  }

  const fetchWithTimeout = RtcrelayCall.fetchWithTimeout;  // one timeout policy for all the page's requests

  function loadConfig() {
    if (!configPromise) {
      configPromise = (async () => {
        const resp = await fetchWithTimeout("./config.json", { cache: "no-store" }, "loading config.json");
        if (!resp.ok) throw new Error(`config.json: HTTP ${resp.status}`);
        config = await resp.json();
        if (!config.signalling_url) throw new Error("config.json has no signalling_url");
        result.config = config;
        return config;
      })();
      configPromise.catch(() => { configPromise = null; });
    }
    return configPromise;
  }

  // -- call ------------------------------------------------------------------------------

  const MEDIA_RESET = {
    connectionState: "new", iceConnectionState: "new", dataChannelState: null, dataChannelEcho: null,
    echoRttMs: null, echoCount: 0, inboundPackets: 0, inboundBytes: 0, inboundPacketsLost: 0, jitterMs: null,
    totalAudioEnergy: 0, audioLevel: 0, outboundPackets: 0, outboundBytes: 0, codec: null, rttMs: null,
    setupMs: null, selectedPair: { local: null, remote: null, localType: null, remoteType: null },
  };

  async function call() {
    if (client) throw new Error("a call is already up: hang up first");
    Object.assign(result, MEDIA_RESET, {
      phase: "calling", error: null, sessionUrl: null, pingsSent: 0, iceRestarts: 0, hangupStatus: null,
      serverUfrag: null, migrations: 0,
    });
    window.__sdp = { offer: null, answer: null };
    callStarted = performance.now();
    render();
    try {
      const cfg = await loadConfig();
      log("asking for the microphone");
      localStream = await withTimeout(navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      }), 10000, "getUserMedia");
      const track = localStream.getAudioTracks()[0];
      $("mic").textContent = track ? track.label || "(unnamed)" : "(none)";
      log("POST offer to " + cfg.signalling_url);
      client = new RtcrelayCall({ signallingUrl: cfg.signalling_url, setup: setupPeer, log });
      client.addEventListener("call", (ev) => onCall(ev.detail));
      client.addEventListener("lost", () => {
        // The call is gone (the client calls again): nothing of it is the call's any more.
        pc = dc = null;
        Object.assign(result, MEDIA_RESET);
        result.reconnects += 1;
        result.failedAtMs = callStarted = performance.now();
        render();
      });
      await client.start();
      statsTimer = setInterval(updateStats, STATS_INTERVAL_MS);
      pingTimer = setInterval(sendPing, PING_INTERVAL_MS);
      render();
      return { sessionUrl: result.sessionUrl };
    } catch (err) {
      if (err.leg) window.__sdp = { offer: err.leg.offer, answer: err.leg.answer };
      setError(err);
      await teardown(false);
      throw err;
    }
  }

  // Every connection the call makes (the first, a reconnect, a move) is set up the same way.
  function setupPeer(peer) {
    peer.addEventListener("connectionstatechange", () => {
      if (peer !== pc) return;
      noteConnectionState(peer);
      log("connection: " + peer.connectionState);
      render();
    });
    peer.addEventListener("iceconnectionstatechange", () => {
      if (peer !== pc) return;
      result.iceConnectionState = peer.iceConnectionState;
      log("ICE: " + peer.iceConnectionState);
      render();
    });
    peer.addEventListener("icegatheringstatechange", () => {
      if (peer === pc) { result.iceGatheringState = peer.iceGatheringState; render(); }
    });
    peer.addEventListener("signalingstatechange", () => {
      if (peer === pc) { result.signalingState = peer.signalingState; render(); }
    });
    for (const t of localStream.getAudioTracks()) peer.addTrack(t, localStream);
    const channel = peer.createDataChannel("echo");
    echoChannels.set(peer, channel);
    setupDataChannel(peer, channel);
  }

  function noteConnectionState(peer) {
    result.connectionState = peer.connectionState;
    if (peer.connectionState === "connected" && result.setupMs === null) {
      result.setupMs = Math.round(performance.now() - callStarted);
      result.connectedAtMs = performance.now();
      result.phase = "in call";
    }
  }

  // The call's connection changed: the first one, a reconnect after a failure, or a move.
  // (It may be connected already: its state events before this moment were not the call's.)
  function onCall(leg) {
    pc = leg.pc;
    dc = echoChannels.get(pc) || null;
    window.__sdp = { offer: leg.offer, answer: leg.answer };
    result.sessionUrl = leg.sessionUrl;
    sessionEtag = leg.etag;
    const ufrag = /^a=ice-ufrag:(\S+)/m.exec(leg.answer || "");
    result.serverUfrag = ufrag ? ufrag[1] : null;
    if (leg.reason === "migrate") {
      // make-before-break: the new call is connected and playing already
      result.migrations = client.migrations;
      result.migratedAtMs = performance.now();
    }
    noteConnectionState(pc);
    if (!leg.sessionUrl) log("no Location header (is Access-Control-Expose-Headers set?): hang-up cannot DELETE");
    const audio = $("remote-audio");
    if (leg.remoteStream) {
      audio.srcObject = leg.remoteStream;
      audio.play().catch((err) => log("audio playback: " + err.message));
    }
    pc.addEventListener("track", (ev) => {  // the answer's track, if it came after
      if (ev.target !== pc) return;
      audio.srcObject = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
      audio.play().catch((err) => log("audio playback: " + err.message));
    });
    log(`${leg.reason === "start" ? "answer applied" : leg.reason === "migrate" ? "moved" : "called again"}; session `
        + (result.sessionUrl || "(no Location)"));
    render();
  }

  function setupDataChannel(peer, channel) {
    channel.addEventListener("open", () => {
      if (peer !== pc) return;
      result.dataChannelState = "open";
      log('data channel "echo" open');
      sendPing();
      render();
    });
    channel.addEventListener("close", () => { if (peer === pc) { result.dataChannelState = "closed"; render(); } });
    channel.addEventListener("message", (ev) => {
      if (peer !== pc) return;
      const text = typeof ev.data === "string" ? ev.data : `(${ev.data.byteLength || ev.data.size} bytes)`;
      if (result.dataChannelEcho === null) {
        result.dataChannelEcho = text;
        log("first echo: " + text);
      }
      result.echoCount += 1;
      try {
        const msg = JSON.parse(text);
        if (msg && msg.type === "ping" && typeof msg.t === "number") {
          result.echoRttMs = Math.round((performance.now() - msg.t) * 10) / 10;
        }
      } catch (_) { /* not ours: counted, not timed */ }
      render();
    });
  }

  function sendPing() {
    if (!dc || dc.readyState !== "open") return;
    pingSeq += 1;
    dc.send(JSON.stringify({ type: "ping", seq: pingSeq, t: Math.round(performance.now() * 10) / 10 }));
    result.pingsSent += 1;
  }

  // -- stats -----------------------------------------------------------------------------

  function candidateText(c) {
    if (!c) return null;
    const address = c.address || c.ip;
    const host = address && address.includes(":") ? `[${address}]` : address;
    return `${host}:${c.port}`;
  }

  async function updateStats() {
    const peer = pc;
    if (!peer) return;
    let report;
    try {
      report = await peer.getStats();
    } catch (err) {
      return;
    }
    if (peer !== pc) return;
    let pairId = null;
    report.forEach((s) => {
      if (s.type === "transport") {
        if (s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
        result.dtlsState = s.dtlsState || null;
        result.pairChanges = s.selectedCandidatePairChanges || 0;
        result.srtpCipher = s.srtpCipher || null;
      }
    });
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") {
        result.inboundPackets = s.packetsReceived || 0;
        result.inboundBytes = s.bytesReceived || 0;
        result.inboundPacketsLost = s.packetsLost || 0;
        result.jitterMs = s.jitter !== undefined ? Math.round(s.jitter * 10000) / 10 : null;
        result.totalAudioEnergy = s.totalAudioEnergy || 0;
        result.audioLevel = s.audioLevel || 0;
        if (s.codecId && report.get(s.codecId)) {
          const codec = report.get(s.codecId);
          result.codec = `${codec.mimeType} ${codec.clockRate} Hz${codec.channels ? " ×" + codec.channels : ""}`;
        }
      } else if (s.type === "outbound-rtp" && s.kind === "audio") {
        result.outboundPackets = s.packetsSent || 0;
        result.outboundBytes = s.bytesSent || 0;
      } else if (s.type === "candidate-pair" && !pairId && s.nominated && s.state === "succeeded") {
        pairId = s.id;
      }
    });
    const pair = pairId ? report.get(pairId) : null;
    if (pair) {
      const local = report.get(pair.localCandidateId);
      const remote = report.get(pair.remoteCandidateId);
      result.selectedPair = {
        local: candidateText(local),
        remote: candidateText(remote),
        localType: local ? local.candidateType : null,
        remoteType: remote ? remote.candidateType : null,
      };
      result.rttMs = pair.currentRoundTripTime !== undefined ? Math.round(pair.currentRoundTripTime * 10000) / 10 : null;
    }
    render();
  }

  // -- hang up ---------------------------------------------------------------------------

  async function teardown(deleteSession) {
    clearInterval(statsTimer);
    clearInterval(pingTimer);
    statsTimer = pingTimer = null;
    if (client) {
      const url = client.sessionUrl;
      if (deleteSession) {
        result.hangupStatus = await client.hangup();
        if (url) log(`DELETE ${url}: HTTP ${result.hangupStatus}`);
      } else {
        client.closed = true;
        if (client.pc) client.pc.close();
      }
    }
    if (localStream) localStream.getTracks().forEach((t) => t.stop());
    const audio = $("remote-audio");
    if (audio) audio.srcObject = null;
    client = dc = pc = localStream = null;
  }

  // ICE restart over WHIP (RFC 9725 section 4.3.2): a new offer with new ICE credentials,
  // only its ICE part PATCHed as an SDP fragment; the answer fragment's credentials replace the
  // old ones in the remote description. DTLS and SRTP go on: nothing else is renegotiated.
  async function restartIce() {
    if (!pc || !result.sessionUrl) throw new Error("no call to restart");
    const peer = pc;
    peer.restartIce();
    await peer.setLocalDescription(await peer.createOffer({ iceRestart: true }));
    const sdp = peer.localDescription.sdp;
    const line = (re) => { const m = re.exec(sdp); return m ? m[1] : null; };
    const fragment = [
      `a=ice-ufrag:${line(/^a=ice-ufrag:(\S+)/m)}`,
      `a=ice-pwd:${line(/^a=ice-pwd:(\S+)/m)}`,
      line(/^(m=.*)$/m),
      `a=mid:${line(/^a=mid:(\S+)/m)}`,
    ].join("\r\n") + "\r\n";
    const resp = await fetchWithTimeout(result.sessionUrl, {
      method: "PATCH",
      headers: { "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*" },
      body: fragment,
    }, "ICE restart");
    const answerFragment = await resp.text();
    if (resp.status !== 200) throw new Error(`ICE restart: HTTP ${resp.status}: ${answerFragment.trim()}`);
    sessionEtag = resp.headers.get("ETag");
    const ufrag = /^a=ice-ufrag:(\S+)/m.exec(answerFragment)[1];
    const pwd = /^a=ice-pwd:(\S+)/m.exec(answerFragment)[1];
    const answer = peer.remoteDescription.sdp
      .replace(/^a=ice-ufrag:\S+/gm, `a=ice-ufrag:${ufrag}`)
      .replace(/^a=ice-pwd:\S+/gm, `a=ice-pwd:${pwd}`);
    await peer.setRemoteDescription({ type: "answer", sdp: answer });
    result.serverUfrag = ufrag;
    result.iceRestarts += 1;
    log(`ICE restart: PATCH ${resp.status}, new server ufrag ${ufrag.slice(0, 12)}...`);
    render();
    return { status: resp.status, etag: sessionEtag, serverUfrag: ufrag };
  }

  async function hangup() {
    const hadCall = client !== null;
    await teardown(true);
    if (hadCall) {
      result.connectionState = "closed";
      result.iceConnectionState = "closed";
      result.dataChannelState = "closed";
      if (result.phase !== "error") result.phase = "ended";
      log("hung up");
    }
    render();
    return { hangupStatus: result.hangupStatus };
  }

  // -- view ------------------------------------------------------------------------------

  function setText(id, value) {
    const el = $(id);
    if (el) el.textContent = value === null || value === undefined || value === "" ? "–" : String(value);
  }

  function setPill(id, state) {
    const el = $(id);
    el.textContent = state;
    el.dataset.state = state;
  }

  const fmt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : n);

  function render() {
    setPill("phase", result.phase);
    setPill("connectionState", result.connectionState);
    setPill("iceConnectionState", result.iceConnectionState);
    setText("iceGatheringState", result.iceGatheringState);
    setText("signalingState", result.signalingState);
    setText("session", result.sessionUrl);
    const err = $("error");
    err.hidden = !result.error;
    err.textContent = result.error || "";
    const p = result.selectedPair;
    setText("pair-local", p.local ? `${p.local} (${p.localType})` : null);
    setText("pair-remote", p.remote ? `${p.remote} (${p.remoteType})` : null);
    setText("rtt", result.rttMs !== null ? `${result.rttMs} ms` : null);
    setText("setup", result.setupMs !== null ? `${result.setupMs} ms from Call to connected` : null);
    setText("in-packets", fmt(result.inboundPackets));
    setText("in-bytes", fmt(result.inboundBytes));
    setText("in-loss", `${fmt(result.inboundPacketsLost)} / ${result.jitterMs !== null ? result.jitterMs + " ms" : "–"}`);
    setText("in-energy", result.totalAudioEnergy ? result.totalAudioEnergy.toPrecision(4) : 0);
    $("in-level").style.width = `${Math.min(100, Math.round(Math.sqrt(result.audioLevel) * 100))}%`;
    setText("out-packets", fmt(result.outboundPackets));
    setText("out-bytes", fmt(result.outboundBytes));
    setText("codec", result.codec);
    setText("dc-state", result.dataChannelState);
    setText("dc-rtt", result.echoRttMs !== null ? `${result.echoRttMs} ms` : null);
    setText("dc-count", `${result.echoCount} / ${result.pingsSent}`);
    setText("dc-first", result.dataChannelEcho);
    const inCall = client !== null;
    $("call").disabled = inCall || !config;
    $("hangup").disabled = !inCall;
  }

  // -- wiring ----------------------------------------------------------------------------

  window.__call = call;
  window.__hangup = hangup;
  window.__restartIce = restartIce;
  window.__audioPackets = () => (pc ? RtcrelayCall.inboundAudioPackets(pc) : Promise.resolve(0));

  document.addEventListener("DOMContentLoaded", () => {
    $("call").addEventListener("click", () => { call().catch(() => {}); });
    $("hangup").addEventListener("click", () => { hangup().catch(() => {}); });
    window.addEventListener("pagehide", () => {
      // best effort: tell the transceiver the call is over
      if (result.sessionUrl && client) fetch(result.sessionUrl, { method: "DELETE", keepalive: true }).catch(() => {});
    });
    render();
    loadConfig().then((cfg) => {
      setText("cfg-signalling", cfg.signalling_url);
      setText("cfg-relay", cfg.relay);
      if (result.phase === "idle") result.phase = "ready";
      render();
    }).catch(setError);
  });
})();
