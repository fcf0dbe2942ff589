// Device side of the device gateway (PROTOCOL.md §1, revision 2026-11-30.5).
//
// One GatewayDevice holds one WebSocket to the gateway: it says hello with its
// agents, answers tool calls with the registered async functions, runs agents
// and streams what they emit as agent_data, refreshes its token before it
// expires and reconnects with capped exponential back-off and full jitter.
// No runtime dependency: the standard WebSocket (browser, Node >= 22) or an
// injected constructor with the same API (the `ws` package on Node 20).

const DEFAULTS = Object.freeze({
  eventAcks: false,
  maxUnackedEvents: 1000,
  maxFrameBytes: 4 * 1024 * 1024,
  refreshMarginMs: 60_000,
  helloTimeoutMs: 20_000,
  tokenRetryAfter: 3,
  backoff: Object.freeze({ initialMs: 1000, maxMs: 30_000, stableMs: 10_000 }),
});

// Limits the gateway enforces on device_hello (§1.2): checked here so that a
// bad configuration is a TypeError at construction, not a 1008 loop.
const MAX_ID_LENGTH = 256;
const MAX_AGENT_IDS = 256;
// C0, DEL and C1 control characters.
const CONTROL_CHARS = /[\u0000-\u001f\u007f-\u009f]/;
// While the socket's send buffer holds more than this, emit() waits for it to drain.
const SEND_HIGH_WATER_BYTES = 1024 * 1024;
const DRAIN_POLL_MS = 20;
// Never refresh a token more often than this, whatever getToken() returns.
const MIN_REFRESH_DELAY_MS = 1000;

// Finished runs whose agent_complete is kept for a resend after a reconnect.
const COMPLETED_KEPT = 100;

const OPEN = 1; // WebSocket.OPEN, the same in every implementation

/** Delay before reconnect attempt `attempt` (0-based): full jitter over a capped exponential. */
export function backoffDelay(attempt, { initialMs = 1000, maxMs = 30_000 } = {}, random = Math.random) {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** The `exp` claim of a JWT in milliseconds since the epoch, or null (not verified: the gateway does that). */
export function tokenExpiry(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const base64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = base64 + '='.repeat((4 - (base64.length % 4)) % 4);
    const json = new TextDecoder().decode(Uint8Array.from(atob(padded), (c) => c.charCodeAt(0)));
    const exp = JSON.parse(json).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

function idProblem(value) {
  if (typeof value !== 'string') return 'must be a string';
  if (value.length < 1 || value.length > MAX_ID_LENGTH) return `must be 1-${MAX_ID_LENGTH} characters`;
  if (CONTROL_CHARS.test(value)) return 'must not contain control characters';
  if (value.trim() === '') return 'must not be only whitespace';
  return null;
}

function byteLength(text) {
  return new TextEncoder().encode(text).length;
}

function errorMessage(error) {
  if (error instanceof Error) return error.message || error.name;
  return String(error);
}

/** Thrown by emit() and progress() once the run or call is over; agents may catch it. */
export class GatewayAbortError extends Error {
  constructor(reason) {
    super(`aborted: ${reason}`);
    this.name = 'AbortError';
    this.reason = reason;
  }
}

/** One agent run on this device: its events not yet confirmed, and who waits for room. */
class Run {
  constructor(runId, agentId) {
    this.runId = runId;
    this.agentId = agentId;
    this.controller = new AbortController();
    this.nextSeq = 1;
    this.pending = []; // [{seq, frame}] in seq order: not yet acked (event_acks) or not yet sent
    this.sentSeq = 0; // highest seq written on the current socket
    this.attached = true; // false between a disconnect and the hello_ack that lists it again
    this.completion = null; // the agent_complete frame, once the agent has finished
    this.waiters = []; // resolvers of emit() calls waiting for room
  }

  wake() {
    const waiters = this.waiters;
    this.waiters = [];
    for (const resolve of waiters) resolve();
  }
}

export class GatewayDevice extends EventTarget {
  /**
   * @param {import('./index.js').GatewayDeviceOptions} options
   */
  constructor(options) {
    super();
    if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
    const { url, deviceId, getToken, tools = {}, agents = {} } = options;
    let parsed;
    try {
      parsed = new URL(url);
    } catch {
      throw new TypeError('url must be a ws:// or wss:// URL');
    }
    if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
      throw new TypeError('url must be a ws:// or wss:// URL');
    }
    const problem = idProblem(deviceId);
    if (problem) throw new TypeError(`deviceId ${problem}`);
    if (typeof getToken !== 'function') throw new TypeError('getToken must be a function returning a token');
    for (const [kind, table] of [['tools', tools], ['agents', agents]]) {
      if (table === null || typeof table !== 'object') throw new TypeError(`${kind} must be an object of functions`);
      for (const [name, fn] of Object.entries(table)) {
        if (typeof fn !== 'function') throw new TypeError(`${kind}.${name} must be a function`);
      }
    }
    const agentIds = Object.keys(agents);
    if (agentIds.length > MAX_AGENT_IDS) throw new TypeError(`at most ${MAX_AGENT_IDS} agents`);
    for (const agentId of agentIds) {
      const agentProblem = idProblem(agentId);
      if (agentProblem) throw new TypeError(`agent id ${JSON.stringify(agentId)} ${agentProblem}`);
    }
    const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketImpl !== 'function') {
      throw new TypeError('no WebSocket: pass options.WebSocket (e.g. the `ws` package on Node 20)');
    }
    const maxUnackedEvents = options.maxUnackedEvents ?? DEFAULTS.maxUnackedEvents;
    if (!Number.isInteger(maxUnackedEvents) || maxUnackedEvents < 1) {
      throw new TypeError('maxUnackedEvents must be a positive integer');
    }

    this.url = parsed;
    this.deviceId = deviceId;
    this._getToken = getToken;
    this._tools = { ...tools };
    this._agents = { ...agents };
    this._WebSocket = WebSocketImpl;
    this.eventAcks = Boolean(options.eventAcks ?? DEFAULTS.eventAcks);
    this._maxUnacked = maxUnackedEvents;
    this._maxFrameBytes = options.maxFrameBytes ?? DEFAULTS.maxFrameBytes;
    this._refreshMarginMs = options.refreshMarginMs ?? DEFAULTS.refreshMarginMs;
    this._helloTimeoutMs = options.helloTimeoutMs ?? DEFAULTS.helloTimeoutMs;
    this._tokenRetryAfter = options.tokenRetryAfter ?? DEFAULTS.tokenRetryAfter;
    this._backoff = { ...DEFAULTS.backoff, ...(options.backoff ?? {}) };
    this._random = options.random ?? Math.random;

    this._state = 'idle'; // idle | connecting | open | waiting | stopped
    this._socket = null;
    this._token = null;
    this._tokenStale = true; // ask getToken() before the next connect
    this._attempt = 0; // consecutive failed connections, for the back-off
    this._failuresBeforeOpen = 0; // consecutive sockets that never opened
    this._openedAt = 0;
    this._acking = false; // event_acks in force on this connection
    this.connectionId = null;
    this._timers = new Set();
    this._calls = new Map(); // call id -> AbortController, for the current socket only
    this._runs = new Map(); // run id -> Run, across reconnects
    // Completions sent but perhaps not processed: resent if the gateway still lists the run.
    this._completed = new Map(); // run id -> agent_complete frame, the last COMPLETED_KEPT
    this._lastFrameAt = 0;
  }

  /** 'idle' | 'connecting' | 'open' | 'waiting' | 'stopped' */
  get state() {
    return this._state;
  }

  /** Events emitted by running agents and not yet confirmed (acked under event_acks, else sent). */
  get pendingEvents() {
    let count = 0;
    for (const run of this._runs.values()) count += run.pending.length;
    return count;
  }

  /** Start connecting (and keep reconnecting until stop() or a 4000 replacement). */
  start() {
    if (this._state !== 'idle') throw new Error(`start() on a device that is ${this._state}`);
    this._connect();
    return this;
  }

  /** Close for good: no reconnect; running tool calls and agents are aborted. */
  stop(reason = 'stopped') {
    if (this._state === 'stopped') return;
    this._finish(reason);
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      this._dropCalls(reason);
      try {
        socket.close(1000, reason.slice(0, 100));
      } catch {
        // a socket still connecting may refuse close() in some implementations
      }
    }
  }

  // ------------------------------------------------------------------ connecting

  async _connect() {
    if (this._state === 'stopped') return;
    this._state = 'connecting';
    let token;
    try {
      if (this._tokenStale || this._token === null || this._expiresSoon(this._token)) {
        this._token = await this._getToken();
        this._tokenStale = false;
      }
      token = this._token;
      if (typeof token !== 'string' || token === '') throw new TypeError('getToken() must return a non-empty string');
    } catch (error) {
      this._tokenStale = true;
      this._emit('token-error', { error });
      this._scheduleReconnect();
      return;
    }
    if (this._state === 'stopped') return;
    const target = new URL(this.url);
    target.searchParams.set('token', token);
    let socket;
    try {
      socket = new this._WebSocket(target.toString());
    } catch (error) {
      // A URL or policy the WebSocket constructor refuses: a failure before open like any other.
      this._onClose(1006, errorMessage(error), false);
      return;
    }
    this._socket = socket;
    let opened = false;
    let acked = false;
    const helloTimer = this._setTimer(() => {
      if (this._socket === socket && !acked) this._abandon(socket, 4408, 'no hello_ack', opened);
    }, this._helloTimeoutMs);
    socket.addEventListener('open', () => {
      if (this._socket !== socket) return;
      opened = true;
      this._failuresBeforeOpen = 0;
      this._lastFrameAt = Date.now();
      const hello = { type: 'device_hello', device_id: this.deviceId, agent_ids: Object.keys(this._agents) };
      if (this.eventAcks) hello.capabilities = ['event_acks'];
      socket.send(JSON.stringify(hello));
    });
    socket.addEventListener('message', (event) => {
      if (this._socket !== socket) return;
      this._lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(typeof event.data === 'string' ? event.data : String(event.data));
      } catch {
        return; // the gateway only sends JSON text; anything else is not ours to act on
      }
      if (frame === null || typeof frame !== 'object' || typeof frame.type !== 'string') return;
      if (frame.type === 'hello_ack') {
        acked = true;
        this._clearTimer(helloTimer);
        this._onHelloAck(socket, frame);
        return;
      }
      if (!acked) return;
      this._onFrame(socket, frame);
    });
    socket.addEventListener('close', (event) => {
      this._clearTimer(helloTimer);
      if (this._socket !== socket) return;
      this._onClose(event.code, event.reason ?? '', opened);
    });
    socket.addEventListener('error', () => {
      // Always followed by 'close', which decides what to do.
    });
  }

  _expiresSoon(token) {
    const exp = tokenExpiry(token);
    return exp !== null && exp - Date.now() < Math.min(this._refreshMarginMs, 5000);
  }

  /** Give up on a socket at once (no hello_ack, silent network): do not wait for a close handshake. */
  _abandon(socket, code, reason, opened = true) {
    this._socket = null;
    try {
      socket.close(code, reason);
    } catch {
      // already closing
    }
    this._onClose(code, reason, opened);
  }

  _onClose(code, reason, opened) {
    this._socket = null;
    this.connectionId = null;
    this._clearHeartbeat();
    this._clearTimer(this._refreshTimer);
    this._dropCalls('disconnected');
    for (const run of this._runs.values()) run.attached = false;
    if (this._state === 'stopped') return;
    if (this._state === 'open' && Date.now() - this._openedAt >= this._backoff.stableMs) this._attempt = 0;
    const detail = { code, reason, willReconnect: code !== 4000 };
    if (code === 4000) {
      // Replaced by a newer connection of this device: reconnecting would replace it back.
      this._emit('close', detail);
      this._finish('replaced');
      return;
    }
    if (!opened) {
      this._failuresBeforeOpen += 1;
      // A refused handshake (401) shows as 1006 without a reason: after a few, ask for a new token.
      if (this._failuresBeforeOpen % this._tokenRetryAfter === 0) this._tokenStale = true;
    }
    if (code === 4001 || code === 1008) this._tokenStale = true;
    let delay;
    if (code === 4001 && opened) {
      // Token expired on a healthy connection: reconnect soon, spread out.
      delay = backoffDelay(0, this._backoff, this._random);
    } else if (code === 4002) {
      // Too many devices for this user: only another device leaving helps; wait long.
      delay = backoffDelay(30, this._backoff, this._random);
    }
    this._emit('close', detail);
    this._scheduleReconnect(delay);
  }

  _scheduleReconnect(delay) {
    if (this._state === 'stopped') return;
    this._state = 'waiting';
    const ms = delay ?? backoffDelay(this._attempt, this._backoff, this._random);
    this._attempt += 1;
    this._emit('reconnecting', { delayMs: ms, attempt: this._attempt });
    this._setTimer(() => this._connect(), ms);
  }

  _finish(reason) {
    this._state = 'stopped';
    for (const timer of this._timers) clearTimeout(timer);
    this._timers.clear();
    this._clearHeartbeat();
    for (const run of this._runs.values()) this._abortRun(run, reason);
    this._emit('stopped', { reason });
  }

  // ------------------------------------------------------------------ frames in

  _onHelloAck(socket, frame) {
    const first = this._state !== 'open';
    this._state = 'open';
    this.connectionId = typeof frame.connection_id === 'string' ? frame.connection_id : null;
    if (first) this._openedAt = Date.now();
    // A gateway of revision .4 has no hello_ack.runs and sends no agent_ack:
    // keeping events for acks that never come would stall every run.
    this._acking = this.eventAcks && Array.isArray(frame.runs);
    this._startHeartbeat(socket, frame.heartbeat_s);
    this._scheduleRefresh(socket);
    // Runs the gateway kept for us (§1.8): resend what it has not stored, then go on.
    const listed = new Map();
    for (const entry of Array.isArray(frame.runs) ? frame.runs : []) {
      if (entry && typeof entry.run_id === 'string') listed.set(entry.run_id, entry);
    }
    for (const run of [...this._runs.values()]) {
      if (run.attached) continue;
      const entry = listed.get(run.runId);
      if (!entry) {
        // Not kept by the gateway (failed on disconnect, or the window passed): stop the agent.
        this._abortRun(run, 'run_lost');
        continue;
      }
      run.attached = true;
      if (this._acking) {
        // Resend everything not acked, even what last_seq covers: after a
        // replacement last_seq counts events accepted but not yet stored, which
        // a crash would lose. The gateway acks the copies it already has and
        // does not store them twice.
        run.sentSeq = run.pending.length > 0 ? run.pending[0].seq - 1 : run.nextSeq - 1;
      } else {
        const lastSeq = Number.isInteger(entry.last_seq) ? entry.last_seq : 0;
        this._confirm(run, lastSeq);
        run.sentSeq = lastSeq;
      }
      this._flush(run);
    }
    for (const [runId, entry] of listed) {
      if (this._completed.has(runId)) {
        // Our agent_complete was lost with the old socket: say it again.
        this._send(socket, this._completed.get(runId));
      } else if (!this._runs.has(runId)) {
        // A run this device no longer has (the app restarted): end it rather than leave it running.
        this._send(socket, {
          type: 'agent_complete', run_id: runId, status: 'error',
          errors: ['device lost the run (restarted)'],
        });
        this._emit('run-lost', { runId, agentId: entry.agent_id, reason: 'unknown_to_device' });
      }
    }
    this._emit('open', { connectionId: this.connectionId, runs: [...listed.keys()], eventAcks: this._acking });
  }

  _onFrame(socket, frame) {
    switch (frame.type) {
      case 'tool_call':
        this._onToolCall(socket, frame);
        break;
      case 'tool_cancel': {
        const controller = this._calls.get(frame.id);
        if (controller) {
          this._calls.delete(frame.id);
          controller.abort(new GatewayAbortError(frame.reason ?? 'cancelled'));
        }
        break;
      }
      case 'agent_run':
        this._onAgentRun(socket, frame);
        break;
      case 'agent_cancel': {
        const run = this._runs.get(frame.run_id);
        if (run) this._abortRun(run, frame.reason ?? 'cancelled');
        break;
      }
      case 'agent_ack': {
        const run = this._runs.get(frame.run_id);
        if (run && Number.isInteger(frame.seq)) this._confirm(run, frame.seq);
        break;
      }
      case 'ping':
        this._send(socket, { type: 'pong' });
        break;
      case 'error':
        this._emit('gateway-error', { code: frame.code, message: frame.message, ref: frame.ref });
        break;
      default:
        // pong, and frame types of later revisions: nothing to do.
        break;
    }
  }

  // ------------------------------------------------------------------ tools

  async _onToolCall(socket, frame) {
    const { id, tool } = frame;
    if (typeof id !== 'string') return;
    const fn = Object.hasOwn(this._tools, tool) ? this._tools[tool] : undefined;
    if (!fn) {
      this._send(socket, { type: 'tool_result', id, error: { code: 'unknown_tool', message: `no tool ${JSON.stringify(tool)} on this device` } });
      return;
    }
    const controller = new AbortController();
    this._calls.set(id, controller);
    const progress = (value, message) => {
      if (controller.signal.aborted) throw controller.signal.reason;
      if (this._calls.get(id) !== controller) return; // answered already: the gateway forgot the call
      const update = { type: 'tool_progress', id };
      if (typeof value === 'number' && Number.isFinite(value)) update.progress = value;
      if (typeof message === 'string') update.message = message;
      this._send(socket, update);
    };
    let reply;
    try {
      const result = await fn(frame.args ?? {}, {
        signal: controller.signal, progress, callId: id, timeoutMs: frame.timeout_ms,
      });
      reply = { type: 'tool_result', id, result: result === undefined ? null : result };
    } catch (error) {
      reply = {
        type: 'tool_result', id,
        error: { code: typeof error?.code === 'string' ? error.code : 'tool_error', message: errorMessage(error) },
      };
    }
    // Cancelled, or the socket it came on is gone: the gateway has already failed the call.
    if (this._calls.get(id) !== controller) return;
    this._calls.delete(id);
    let text;
    try {
      text = JSON.stringify(reply);
    } catch (error) {
      text = JSON.stringify({ type: 'tool_result', id, error: { code: 'bad_result', message: errorMessage(error) } });
    }
    if (byteLength(text) > this._maxFrameBytes) {
      text = JSON.stringify({ type: 'tool_result', id, error: { code: 'result_too_large', message: `result exceeds ${this._maxFrameBytes} bytes` } });
    }
    this._sendText(socket, text);
  }

  _dropCalls(reason) {
    const calls = [...this._calls.values()];
    this._calls.clear();
    for (const controller of calls) controller.abort(new GatewayAbortError(reason));
  }

  // ------------------------------------------------------------------ agent runs

  _onAgentRun(socket, frame) {
    const { run_id: runId, agent_id: agentId } = frame;
    if (typeof runId !== 'string' || this._runs.has(runId)) return;
    const fn = Object.hasOwn(this._agents, agentId) ? this._agents[agentId] : undefined;
    if (!fn) {
      this._send(socket, { type: 'agent_complete', run_id: runId, status: 'error', errors: [`no agent ${JSON.stringify(agentId)} on this device`] });
      return;
    }
    const run = new Run(runId, agentId);
    this._runs.set(runId, run);
    this._emit('run-start', { runId, agentId });
    this._drive(run, fn, frame.input);
  }

  async _drive(run, fn, input) {
    const emit = (data) => this._emitEvent(run, data);
    const context = { signal: run.controller.signal, emit, runId: run.runId };
    let completion;
    try {
      let result = await fn(input, context);
      if (result && typeof result[Symbol.asyncIterator] === 'function') {
        // An async generator: every yielded value is an event, its return value the result.
        const iterator = result[Symbol.asyncIterator]();
        for (;;) {
          const step = await iterator.next();
          if (step.done) {
            result = step.value;
            break;
          }
          await emit(step.value);
        }
      }
      completion = { type: 'agent_complete', run_id: run.runId, status: 'completed' };
      if (result !== undefined) completion.result = result;
    } catch (error) {
      completion = { type: 'agent_complete', run_id: run.runId, status: 'error', errors: [errorMessage(error)] };
    }
    if (run.controller.signal.aborted) return; // cancelled or lost: the gateway has ended the run
    run.completion = completion;
    this._flush(run);
  }

  async _emitEvent(run, data) {
    if (run.controller.signal.aborted) throw run.controller.signal.reason;
    if (data === undefined) throw new TypeError('an event must be a JSON value, not undefined');
    const seq = run.nextSeq;
    const frame = { type: 'agent_data', run_id: run.runId, data };
    if (this.eventAcks) frame.seq = seq;
    const text = JSON.stringify(frame);
    if (byteLength(text) > this._maxFrameBytes) throw new RangeError(`event exceeds ${this._maxFrameBytes} bytes`);
    run.nextSeq += 1;
    run.pending.push({ seq, text });
    this._flush(run);
    // Back-pressure: wait while the run holds its cap of unconfirmed events
    // (acks, or a socket to send on) or the socket's own buffer is full.
    while (run.pending.length >= this._maxUnacked && !run.controller.signal.aborted) {
      await new Promise((resolve) => run.waiters.push(resolve));
    }
    while (this._socket && this._socket.readyState === OPEN
           && this._socket.bufferedAmount > SEND_HIGH_WATER_BYTES && !run.controller.signal.aborted) {
      await new Promise((resolve) => setTimeout(resolve, DRAIN_POLL_MS));
    }
    if (run.controller.signal.aborted) throw run.controller.signal.reason;
  }

  /** Send whatever the run has not sent on the current socket, then its completion. */
  _flush(run) {
    const socket = this._socket;
    if (!socket || this._state !== 'open' || !run.attached || socket.readyState !== OPEN) return;
    for (const item of run.pending) {
      if (item.seq <= run.sentSeq) continue;
      socket.send(item.text);
      run.sentSeq = item.seq;
    }
    if (!this._acking) {
      // Without acks, handing an event to an open socket is all the confirmation there is.
      run.pending = [];
      run.wake();
    }
    if (run.completion && run.sentSeq === run.nextSeq - 1) {
      socket.send(JSON.stringify(run.completion));
      run.completionSent = true;
      this._forgetIfDone(run);
    }
  }

  /** Every event up to `seq` is stored: drop it from the resend buffer. */
  _confirm(run, seq) {
    let index = 0;
    while (index < run.pending.length && run.pending[index].seq <= seq) index += 1;
    if (index > 0) {
      run.pending.splice(0, index);
      run.wake();
    }
    this._forgetIfDone(run);
  }

  _forgetIfDone(run) {
    if (run.completionSent && run.pending.length === 0) {
      this._runs.delete(run.runId);
      this._completed.set(run.runId, run.completion);
      if (this._completed.size > COMPLETED_KEPT) this._completed.delete(this._completed.keys().next().value);
      this._emit('run-end', { runId: run.runId, status: run.completion.status });
    }
  }

  _abortRun(run, reason) {
    this._runs.delete(run.runId);
    if (!run.controller.signal.aborted) run.controller.abort(new GatewayAbortError(reason));
    run.wake();
    this._emit('run-end', { runId: run.runId, status: 'aborted', reason });
  }

  // ------------------------------------------------------------------ heartbeat and token refresh

  _startHeartbeat(socket, heartbeatS) {
    this._clearHeartbeat();
    const periodMs = (typeof heartbeatS === 'number' && heartbeatS > 0 ? heartbeatS : 30) * 1000;
    // Browsers cannot see WebSocket pings: a sleeping laptop's dead socket is
    // noticed by our own ping going unanswered for two periods.
    this._heartbeat = setInterval(() => {
      if (this._socket !== socket) return;
      if (Date.now() - this._lastFrameAt > 2 * periodMs) {
        this._abandon(socket, 4408, 'heartbeat timeout');
        return;
      }
      this._send(socket, { type: 'ping' });
    }, periodMs);
  }

  _clearHeartbeat() {
    if (this._heartbeat) clearInterval(this._heartbeat);
    this._heartbeat = null;
  }

  _scheduleRefresh(socket) {
    this._clearTimer(this._refreshTimer);
    this._refreshTimer = null;
    const exp = tokenExpiry(this._token);
    if (exp === null || this._refreshMarginMs <= 0) return;
    const remaining = exp - Date.now();
    const delay = Math.max(MIN_REFRESH_DELAY_MS, remaining - Math.min(this._refreshMarginMs, remaining / 2));
    this._refreshTimer = this._setTimer(async () => {
      if (this._socket !== socket) return;
      let token;
      try {
        token = await this._getToken();
      } catch (error) {
        this._emit('token-error', { error });
      }
      if (this._socket !== socket) return;
      if (typeof token === 'string' && token !== '') {
        this._token = token;
        this._send(socket, { type: 'auth_refresh', token });
        this._emit('token-refreshed', { expiresAt: tokenExpiry(token) });
      }
      this._scheduleRefresh(socket);
    }, delay);
  }

  // ------------------------------------------------------------------ plumbing

  _send(socket, frame) {
    this._sendText(socket, JSON.stringify(frame));
  }

  _sendText(socket, text) {
    if (socket === this._socket && socket.readyState === OPEN) socket.send(text);
  }

  _setTimer(fn, ms) {
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      fn();
    }, ms);
    this._timers.add(timer);
    return timer;
  }

  _clearTimer(timer) {
    if (timer === undefined || timer === null) return;
    clearTimeout(timer);
    this._timers.delete(timer);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
