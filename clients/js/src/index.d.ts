// Types of the device SDK (src/index.js). PROTOCOL.md §1, revision 2026-11-30.5.

/** Any value JSON can carry (what tools take and return, and agents emit). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** What a tool function gets besides its arguments. */
export interface ToolContext {
  /** Aborted on `tool_cancel` (reason `timeout` / `caller_gone`) or when the connection drops. */
  signal: AbortSignal;
  /** Sends `tool_progress`: the call's timeout restarts (never past its `max_timeout_s`). */
  progress(progress?: number, message?: string): void;
  callId: string;
  /** The caller's timeout, restarted by each progress(). */
  timeoutMs: number | undefined;
}

/**
 * A tool: its resolved value is the result (undefined becomes null); a thrown
 * error becomes `{code: error.code ?? "tool_error", message: error.message}`.
 */
export type Tool = (args: any, context: ToolContext) => Promise<Json | void> | Json | void;

/** What an agent function gets besides its input. */
export interface AgentContext {
  /** Aborted on `agent_cancel`, on stop(), on replacement, or when the gateway no longer has the run. */
  signal: AbortSignal;
  /**
   * Streams one event (`agent_data`). Resolves at once unless the run already
   * holds `maxUnackedEvents` unconfirmed events: then it waits (back-pressure).
   * Rejects once the run is aborted, and with a RangeError for an event larger
   * than `maxFrameBytes`.
   */
  emit(data: Json): Promise<void>;
  runId: string;
}

/**
 * An agent: either an async function that emits events and resolves with the
 * run's result, or an async generator whose yielded values are the events and
 * whose return value is the result. A thrown error ends the run with status
 * `error` and the error's message in `errors`.
 */
export type Agent =
  | ((input: any, context: AgentContext) => Promise<Json | void> | Json | void)
  | ((input: any, context: AgentContext) => AsyncIterable<Json>);

/** The constructor of a standard WebSocket (browser, Node >= 22, or the `ws` package). */
export interface WebSocketConstructor {
  new (url: string): WebSocketLike;
}

export interface WebSocketLike {
  readonly readyState: number;
  readonly bufferedAmount: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: any) => void): void;
}

export interface BackoffOptions {
  /** Ceiling of the first reconnect delay (default 1000 ms); doubles per failed attempt. */
  initialMs?: number;
  /** Largest ceiling (default 30000 ms). Each delay is uniform in [0, ceiling): full jitter. */
  maxMs?: number;
  /** A connection open this long (default 10000 ms) resets the back-off. */
  stableMs?: number;
}

export interface GatewayDeviceOptions {
  /** `ws(s)://host/api/v1/ws/device`; the token is added as `?token=`. */
  url: string;
  /** 1-256 characters, no control characters, not only whitespace. */
  deviceId: string;
  /** A device JWT for this user; called at first connect, before it expires, and after auth failures. */
  getToken: () => Promise<string> | string;
  /** Tool name -> function. */
  tools?: Record<string, Tool>;
  /** Agent id -> function; the ids are sent in `device_hello.agent_ids` (at most 256). */
  agents?: Record<string, Agent>;
  /** Default: globalThis.WebSocket. On Node 20 pass `WebSocket` from the `ws` package. */
  WebSocket?: WebSocketConstructor;
  /**
   * Ask for `agent_ack` (§1.8): events carry `seq`, are kept until acknowledged
   * and resent after a reconnect, so each is stored exactly once. Used only when
   * the gateway's hello_ack shows it supports §1.8. Default false.
   */
  eventAcks?: boolean;
  /** Unconfirmed events a run may hold before emit() waits (default 1000). */
  maxUnackedEvents?: number;
  /** The gateway's GATEWAY_MAX_FRAME_BYTES (default 4 MiB): larger results/events are refused here. */
  maxFrameBytes?: number;
  /** Refresh the token this long before its `exp` (default 60000 ms; at most half its remaining life). 0: never. */
  refreshMarginMs?: number;
  /** A socket without hello_ack after this long is given up (default 20000 ms). */
  helloTimeoutMs?: number;
  /** After this many sockets in a row that never opened (a 401 looks like that), getToken() is asked again (default 3). */
  tokenRetryAfter?: number;
  backoff?: BackoffOptions;
  /** Random source for the jitter (tests). Default Math.random. */
  random?: () => number;
}

export type DeviceState = 'idle' | 'connecting' | 'open' | 'waiting' | 'stopped';

export interface GatewayDeviceEventMap {
  /**
   * hello_ack received; `runs` are the run ids the gateway kept for this device;
   * `eventAcks`: acks are in force on this connection (asked for, and the gateway has §1.8).
   */
  open: CustomEvent<{ connectionId: string | null; runs: string[]; eventAcks: boolean }>;
  /** The socket closed; `willReconnect` is false only for 4000 (replaced). */
  close: CustomEvent<{ code: number; reason: string; willReconnect: boolean }>;
  reconnecting: CustomEvent<{ delayMs: number; attempt: number }>;
  /** For good: stop() was called or the connection was replaced (4000). */
  stopped: CustomEvent<{ reason: string }>;
  /** An `error` frame from the gateway (a refused frame). */
  'gateway-error': CustomEvent<{ code: string; message: string; ref: string | null }>;
  'token-error': CustomEvent<{ error: unknown }>;
  'token-refreshed': CustomEvent<{ expiresAt: number | null }>;
  'run-start': CustomEvent<{ runId: string; agentId: string }>;
  /** status: the completion sent (`completed` / `error`), or `aborted` (cancelled, lost, stopped). */
  'run-end': CustomEvent<{ runId: string; status: string; reason?: string }>;
  /** The gateway handed over a run this instance does not know (the app restarted): it is ended as error. */
  'run-lost': CustomEvent<{ runId: string; agentId: string; reason: string }>;
}

export declare class GatewayDevice extends EventTarget {
  constructor(options: GatewayDeviceOptions);
  readonly url: URL;
  readonly deviceId: string;
  readonly eventAcks: boolean;
  /** The gateway's id for the current connection (null while not open). */
  readonly connectionId: string | null;
  readonly state: DeviceState;
  /** Events emitted by running agents and not yet confirmed. */
  readonly pendingEvents: number;
  /** Start connecting; reconnects until stop() or a replacement. Throws unless idle. */
  start(): this;
  /** Close for good (1000); running tools and agents are aborted. */
  stop(reason?: string): void;
  addEventListener<K extends keyof GatewayDeviceEventMap>(
    type: K, listener: (event: GatewayDeviceEventMap[K]) => void, options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof GatewayDeviceEventMap>(
    type: K, listener: (event: GatewayDeviceEventMap[K]) => void, options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions): void;
}

/** The reason of an aborted tool or agent signal (`reason`: timeout, caller_gone, disconnected, replaced, run_lost, ...). */
export declare class GatewayAbortError extends Error {
  constructor(reason: string);
  readonly name: 'AbortError';
  readonly reason: string;
}

/** Delay before reconnect attempt `attempt` (0-based): uniform in [0, min(maxMs, initialMs * 2^attempt)). */
export declare function backoffDelay(attempt: number, options?: BackoffOptions, random?: () => number): number;

/** The JWT's `exp` in milliseconds since the epoch, or null; the signature is not checked. */
export declare function tokenExpiry(token: string): number | null;
