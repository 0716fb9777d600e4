// rtcrelay demo call: one WebRTC call to the echo transceiver, through the relay.
//
// Signalling is WHIP-style: POST the SDP offer (Content-Type: application/sdp) to the
// signalling URL from ./config.json -> 201 Created, the SDP answer, and a Location for the
// session; DELETE that Location hangs up. No STUN/TURN (iceServers: []): the transceiver's
// only candidate is the relay's address and it ignores the browser's candidates, so the
// offer is sent once, after ICE gathering (no trickle).
//
// Test hooks:
//   window.__call()    -> Promise: resolves once the answer is applied (not yet connected)
//   window.__hangup()  -> Promise: DELETE the session, close the connection
//   window.__result    -> live snapshot (see `result` below), updated every 500 ms
"use strict";

(function () {
  const STATS_INTERVAL_MS = 500;
  const PING_INTERVAL_MS = 1000;
  const GATHER_TIMEOUT_MS = 3000;
  const HTTP_TIMEOUT_MS = 10000;

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
  let pc = null;
  let dc = null;
  let localStream = null;
  let statsTimer = null;
  let pingTimer = null;
  let pingSeq = 0;
  let sessionEtag = null;  // the session's ETag (WHIP: a PATCH names it)
  let lastInbound = -1;    // inbound audio packets at the last stats tick
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

  async function fetchWithTimeout(url, options, what) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), HTTP_TIMEOUT_MS);
    try {
      return await fetch(url, { ...options, signal: abort.signal });
    } catch (err) {
      throw new Error(`${what} (${url}): ${abort.signal.aborted ? "timed out" : err.message}`);
    } finally {
      clearTimeout(timer);
    }
  }

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

  function waitGatheringComplete(peer, ms) {
    if (peer.iceGatheringState === "complete") return Promise.resolve(true);
    return new Promise((resolve) => {
      const done = (complete) => {
        clearTimeout(timer);
        peer.removeEventListener("icegatheringstatechange", check);
        resolve(complete);
      };
      const check = () => { if (peer.iceGatheringState === "complete") done(true); };
      const timer = setTimeout(() => done(false), ms);
      peer.addEventListener("icegatheringstatechange", check);
    });
  }

  // -- call ------------------------------------------------------------------------------

  async function call() {
    if (pc) throw new Error("a call is already up: hang up first");
    Object.assign(result, {
      phase: "calling", error: null, connectionState: "new", iceConnectionState: "new", sessionUrl: null,
      dataChannelState: null, dataChannelEcho: null, echoRttMs: null, echoCount: 0, pingsSent: 0, iceRestarts: 0,
      inboundPackets: 0, inboundBytes: 0, inboundPacketsLost: 0, jitterMs: null, totalAudioEnergy: 0,
      audioLevel: 0, outboundPackets: 0, outboundBytes: 0, codec: null, rttMs: null, setupMs: null,
      selectedPair: { local: null, remote: null, localType: null, remoteType: null }, hangupStatus: null,
      serverUfrag: null,
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

      pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: "max-bundle" });
      const peer = pc;
      peer.addEventListener("connectionstatechange", () => {
        if (peer !== pc) return;
        result.connectionState = peer.connectionState;
        if (peer.connectionState === "connected" && result.setupMs === null) {
          result.setupMs = Math.round(performance.now() - callStarted);
          result.connectedAtMs = performance.now();
          result.phase = "in call";
        }
        log("connection: " + peer.connectionState);
        if (peer.connectionState === "failed") {
          // The relay answers the checks of a session whose transceiver died with an error, so
          // ICE fails at once: call again (the signalling sends the new call to a live one).
          reconnect().catch((err) => setError(err));
        }
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
      peer.addEventListener("track", (ev) => {
        log("remote audio track");
        const audio = $("remote-audio");
        audio.srcObject = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
        audio.play().catch((err) => log("audio playback: " + err.message));
      });

      for (const t of localStream.getAudioTracks()) peer.addTrack(t, localStream);
      dc = peer.createDataChannel("echo");
      setupDataChannel(dc);

      await peer.setLocalDescription(await peer.createOffer());
      const complete = await waitGatheringComplete(peer, GATHER_TIMEOUT_MS);
      if (!complete) log(`ICE gathering not complete after ${GATHER_TIMEOUT_MS} ms: sending the offer as is`);

      window.__sdp.offer = peer.localDescription.sdp;
      log("POST offer to " + cfg.signalling_url);
      const resp = await fetchWithTimeout(cfg.signalling_url, {
        method: "POST",
        headers: { "Content-Type": "application/sdp" },
        body: peer.localDescription.sdp,
      }, "signalling");
      const body = await resp.text();
      window.__sdp.answer = body;
      if (resp.status !== 201) throw new Error(`signalling answered HTTP ${resp.status}: ${body.trim()}`);
      const location = resp.headers.get("Location");
      sessionEtag = resp.headers.get("ETag");
      if (location) {
        result.sessionUrl = new URL(location, cfg.signalling_url).href;
      } else {
        log("no Location header (is Access-Control-Expose-Headers set?): hang-up cannot DELETE");
      }
      if (peer !== pc) throw new Error("hung up while signalling");
      const ufrag = /^a=ice-ufrag:(\S+)/m.exec(body);
      result.serverUfrag = ufrag ? ufrag[1] : null;
      await peer.setRemoteDescription({ type: "answer", sdp: body });
      log("answer applied; session " + (result.sessionUrl || "(no Location)"));

      statsTimer = setInterval(updateStats, STATS_INTERVAL_MS);
      render();
      return { sessionUrl: result.sessionUrl };
    } catch (err) {
      setError(err);
      await teardown(false);
      throw err;
    }
  }

  function setupDataChannel(channel) {
    channel.addEventListener("open", () => {
      result.dataChannelState = "open";
      log('data channel "echo" open');
      sendPing();
      pingTimer = setInterval(sendPing, PING_INTERVAL_MS);
      render();
    });
    channel.addEventListener("close", () => { result.dataChannelState = "closed"; render(); });
    channel.addEventListener("message", (ev) => {
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
    // No audio since the last tick in a connected call: ask the session resource. A 404 means
    // the session went with its transceiver: call again now rather than wait for ICE to fail.
    const silent = result.connectionState === "connected" && result.inboundPackets === lastInbound;
    lastInbound = result.inboundPackets;
    if (silent && result.sessionUrl && peer === pc) {
      try {
        const resp = await fetchWithTimeout(result.sessionUrl, { method: "GET" }, "session check");
        if (resp.status === 404 && peer === pc) await reconnect();
      } catch (_) { /* the signalling is unreachable: nothing to learn from it */ }
    }
  }

  // -- hang up ---------------------------------------------------------------------------

  async function teardown(deleteSession) {
    clearInterval(statsTimer);
    clearInterval(pingTimer);
    statsTimer = pingTimer = null;
    const url = result.sessionUrl;
    if (deleteSession && url) {
      try {
        const resp = await fetchWithTimeout(url, { method: "DELETE" }, "hang-up");
        result.hangupStatus = resp.status;
        log(`DELETE ${url}: HTTP ${resp.status}`);
      } catch (err) {
        result.hangupStatus = null;
        log("hang-up: " + err.message);
      }
    }
    if (dc) { try { dc.close(); } catch (_) {} }
    if (pc) { try { pc.close(); } catch (_) {} }
    if (localStream) localStream.getTracks().forEach((t) => t.stop());
    const audio = $("remote-audio");
    if (audio) audio.srcObject = null;
    dc = pc = localStream = null;
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

  let reconnecting = false;
  async function reconnect() {
    if (reconnecting) return;  // the ICE failure and the session check may both see it
    reconnecting = true;
    try {
      await callAgain();
    } finally {
      reconnecting = false;
    }
  }

  async function callAgain() {
    result.reconnects += 1;
    result.failedAtMs = performance.now();
    log(`the call failed: calling again (reconnect ${result.reconnects})`);
    await teardown(false);  // no DELETE: the session went with its transceiver
    await call();
  }

  async function hangup() {
    const hadCall = pc !== null;
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
    const inCall = pc !== null;
    $("call").disabled = inCall || !config;
    $("hangup").disabled = !inCall;
  }

  // -- wiring ----------------------------------------------------------------------------

  window.__call = call;
  window.__hangup = hangup;
  window.__restartIce = restartIce;

  document.addEventListener("DOMContentLoaded", () => {
    $("call").addEventListener("click", () => { call().catch(() => {}); });
    $("hangup").addEventListener("click", () => { hangup().catch(() => {}); });
    window.addEventListener("pagehide", () => {
      // best effort: tell the transceiver the call is over
      if (result.sessionUrl && pc) fetch(result.sessionUrl, { method: "DELETE", keepalive: true }).catch(() => {});
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
