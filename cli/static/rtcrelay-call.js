// rtcrelay-call.js: a reusable browser caller for rtcrelay's WHIP-style signalling, with the
// two behaviours a voice call needs to outlive its transceiver (the Python twin is
// cli/call_client.py):
//
// - Reconnect on failure. The call is made again when its connection goes "failed" (the relay
//   answers the checks of a session whose transceiver died with a signed error, so ICE fails at
//   once) or when no audio came in for a check interval while connected and the session
//   resource (GET) says 404. A call on hold (no audio, 200) is left alone.
// - Migrate on request. A draining transceiver sends {"type": "migrate", "deadline_s": N,
//   "handoff": "..."} on the "rtcrelay-control" data channel this client opens. The client
//   calls again (the signalling sends the offer elsewhere; a 503 is tried again after its
//   Retry-After until the deadline) with the handoff in the Rtcrelay-Handoff header (the old
//   pipeline's sealed state), waits until the new call has received SWITCH_AFTER_PACKETS
//   audio packets, switches to it ("call" event), and only then hangs up the old one
//   (make-before-break).
//
// Usage:
//   const call = new RtcrelayCall({ signallingUrl, setup(pc) { /* tracks, channels, listeners */ },
//                                   log(text) {} });
//   call.addEventListener("call", (ev) => { /* ev.detail: {pc, reason, sessionUrl, etag,
//                                             offer, answer, remoteStream} */ });
//   call.addEventListener("lost", (ev) => { /* ev.detail: {reason} - calling again */ });
//   await call.start();   // resolves once the answer is applied (a 503 is tried again for 10 s)
//   await call.hangup();
// `setup(pc)` runs for every connection the call makes (the first, a reconnect, a move);
// events of a connection that is not `call.pc` belong to a call that is going or gone.
"use strict";

(function (global) {
  const CONTROL_CHANNEL = "rtcrelay-control";
  const HANDOFF_HEADER = "Rtcrelay-Handoff";
  const CHECK_INTERVAL_MS = 500;        // silence check while connected
  const SWITCH_AFTER_PACKETS = 10;      // a moved call switches once the new one has this much audio
  const MOVE_DEADLINE_S = 10;           // a migrate request without deadline_s
  const MOVE_MARGIN_MS = 1000;          // stop trying this long before the deadline
  const RETRY_MS = 1000;                // a reconnect that failed, or a 503 without Retry-After
  const START_DEADLINE_MS = 10000;      // a first call refused with 503 is tried again until then
  const MAX_RECONNECT_ATTEMPTS = 30;
  const HTTP_TIMEOUT_MS = 10000;
  const GATHER_TIMEOUT_MS = 3000;

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  class SignallingError extends Error {
    constructor(status, text, retryAfterMs) {
      super(`signalling answered HTTP ${status}: ${text.trim()}`);
      this.status = status;
      this.retryAfterMs = retryAfterMs;
    }
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

  function gatheringComplete(pc, ms) {
    if (pc.iceGatheringState === "complete") return Promise.resolve(true);
    return new Promise((resolve) => {
      const done = (complete) => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve(complete);
      };
      const check = () => { if (pc.iceGatheringState === "complete") done(true); };
      const timer = setTimeout(() => done(false), ms);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  async function inboundAudioPackets(pc) {
    let packets = 0;
    try {
      (await pc.getStats()).forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "audio") packets += s.packetsReceived || 0;
      });
    } catch (_) { /* a closed connection has no stats */ }
    return packets;
  }

  class RtcrelayCall extends EventTarget {
    constructor({ signallingUrl, setup = () => {}, log = () => {} }) {
      super();
      this.signallingUrl = signallingUrl;
      this.setup = setup;
      this.log = log;
      this.pc = null;
      this.sessionUrl = null;
      this.etag = null;
      this.reconnects = 0;        // calls made again after a failure
      this.migrations = 0;        // calls moved on request
      this.closed = false;
      this._busy = false;         // a reconnect or a move is under way
      this._timer = null;
      this._lastPackets = -1;
    }

    async start() {
      // (a 503: every transceiver busy, or one overloaded for a moment: tried again)
      this._become(await this._dialBefore(performance.now() + START_DEADLINE_MS, null), "start");
      this._timer = setInterval(() => this._check().catch(() => {}), CHECK_INTERVAL_MS);
    }

    async hangup() {
      this.closed = true;
      clearInterval(this._timer);
      const url = this.sessionUrl;
      let status = null;
      if (url) {
        try {
          status = (await fetchWithTimeout(url, { method: "DELETE" }, "hang-up")).status;
        } catch (err) {
          this.log("hang-up: " + err.message);
        }
      }
      if (this.pc) this.pc.close();
      this.pc = null;
      return status;
    }

    // -- one connection ------------------------------------------------------------------

    async _dial(handoff) {
      const pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: "max-bundle" });
      const leg = { pc, remoteStream: null, sessionUrl: null, etag: null, offer: null, answer: null };
      try {
        const control = pc.createDataChannel(CONTROL_CHANNEL);
        control.addEventListener("message", (ev) => this._onControl(pc, ev.data));
        pc.addEventListener("track", (ev) => {
          leg.remoteStream = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
        });
        pc.addEventListener("connectionstatechange", () => {
          if (pc === this.pc && pc.connectionState === "failed") this._reconnect("the connection failed");
        });
        this.setup(pc);
        await pc.setLocalDescription(await pc.createOffer());
        if (!(await gatheringComplete(pc, GATHER_TIMEOUT_MS))) this.log("ICE gathering not complete: offering as is");
        leg.offer = pc.localDescription.sdp;
        const headers = { "Content-Type": "application/sdp" };
        if (handoff) headers[HANDOFF_HEADER] = handoff;
        const resp = await fetchWithTimeout(this.signallingUrl, { method: "POST", headers, body: leg.offer }, "signalling");
        leg.answer = await resp.text();
        if (resp.status !== 201) {
          const retryAfter = Number(resp.headers.get("Retry-After"));
          throw new SignallingError(resp.status, leg.answer, retryAfter > 0 ? retryAfter * 1000 : null);
        }
        const location = resp.headers.get("Location");
        leg.sessionUrl = location ? new URL(location, this.signallingUrl).href : null;
        leg.etag = resp.headers.get("ETag");
        if (this.closed) throw new Error("hung up while signalling");
        await pc.setRemoteDescription({ type: "answer", sdp: leg.answer });
        return leg;
      } catch (err) {
        pc.close();
        err.leg = leg;
        throw err;
      }
    }

    // _dial, again after each 503's Retry-After until the deadline (ms, performance.now()).
    async _dialBefore(deadline, handoff) {
      for (;;) {
        try {
          return await this._dial(handoff);
        } catch (err) {
          const wait = err.retryAfterMs || RETRY_MS;
          if (!(err instanceof SignallingError) || err.status !== 503 || this.closed
              || performance.now() + wait > deadline) throw err;
          this.log(`no room for the call yet (${err.message}): again in ${wait} ms`);
          await sleep(wait);
        }
      }
    }

    _become(leg, reason) {
      this.pc = leg.pc;
      this.sessionUrl = leg.sessionUrl;
      this.etag = leg.etag;
      this._lastPackets = -1;
      this.dispatchEvent(new CustomEvent("call", { detail: { ...leg, reason } }));
    }

    // -- reconnect on failure ------------------------------------------------------------

    async _check() {
      const pc = this.pc;
      if (!pc || this._busy || pc.connectionState !== "connected") return;
      const packets = await inboundAudioPackets(pc);
      const silent = packets === this._lastPackets;
      this._lastPackets = packets;
      if (!silent || !this.sessionUrl || pc !== this.pc) return;
      try {
        const resp = await fetchWithTimeout(this.sessionUrl, { method: "GET" }, "session check");
        if (resp.status === 404 && pc === this.pc) await this._reconnect("the session is gone");
      } catch (_) { /* the signalling is unreachable: nothing to learn from it */ }
    }

    async _reconnect(reason) {
      if (this._busy || this.closed) return;
      this._busy = true;
      try {
        this.reconnects += 1;
        this.log(`${reason}: calling again (reconnect ${this.reconnects})`);
        this.dispatchEvent(new CustomEvent("lost", { detail: { reason } }));
        if (this.pc) this.pc.close();  // no DELETE: the session went with its transceiver
        this.pc = null;
        for (let attempt = 1; !this.closed; attempt++) {
          try {
            this._become(await this._dial(null), "reconnect");
            return;
          } catch (err) {
            if (attempt >= MAX_RECONNECT_ATTEMPTS) throw err;
            this.log(`calling again failed (${err.message}): again shortly`);
            await sleep(err.retryAfterMs || RETRY_MS);
          }
        }
      } finally {
        this._busy = false;
      }
    }

    // -- migrate on request --------------------------------------------------------------

    _onControl(pc, data) {
      let request;
      try {
        request = JSON.parse(data);
      } catch (_) {
        return;
      }
      if (!request || request.type !== "migrate" || pc !== this.pc) return;
      const deadlineS = Number(request.deadline_s) || MOVE_DEADLINE_S;
      const handoff = typeof request.handoff === "string" ? request.handoff : null;
      this._migrate(performance.now() + deadlineS * 1000 - MOVE_MARGIN_MS, handoff, request.reason || "");
    }

    async _migrate(deadline, handoff, reason) {
      if (this._busy || this.closed) return;
      this._busy = true;
      let leg = null;
      try {
        this.log(`asked to move (${reason}): calling again elsewhere`);
        leg = await this._dialBefore(deadline, handoff);
        while ((await inboundAudioPackets(leg.pc)) < SWITCH_AFTER_PACKETS) {
          if (performance.now() > deadline || this.closed) throw new Error("the new call had no audio in time");
          await sleep(20);
        }
        const old = { pc: this.pc, sessionUrl: this.sessionUrl };
        this.migrations += 1;
        this._become(leg, "migrate");
        leg = null;
        if (old.sessionUrl) {
          fetchWithTimeout(old.sessionUrl, { method: "DELETE" }, "hanging up the old call").catch(() => {});
        }
        if (old.pc) old.pc.close();
        this.log(`moved (${this.migrations})`);
      } catch (err) {
        this.log(`moving the call failed (it stays where it is): ${err.message}`);
        if (leg) leg.pc.close();
      } finally {
        this._busy = false;
      }
    }
  }

  RtcrelayCall.fetchWithTimeout = fetchWithTimeout;
  RtcrelayCall.inboundAudioPackets = inboundAudioPackets;
  global.RtcrelayCall = RtcrelayCall;
})(window);
