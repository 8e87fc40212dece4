/**
 * Structured JSON logging (pino). Redaction is configured here and only here: request
 * bodies, hook context, prefetch, tokens, Authorization headers and card text never reach a
 * log line. Code logs ids and counts, never payloads; redaction is the safety net, in layers:
 *
 * 1. `REDACT_PATHS`: pino's fast redaction of known top-level and one-level-deep keys.
 * 2. A log formatter that walks every logged object (any depth, cycles and Errors included)
 *    and censors values under sensitive keys (`SENSITIVE_KEYS`) and secrets inside strings.
 * 3. Child bindings pass through the same walk (pino applies formatters only to the root).
 * 4. Errors, wherever they are, become `{ type, message, stack, code?, status?, reason?,
 *    field?, cause? }` with their message and stack scrubbed; other own properties of an
 *    error (request bodies, configs, headers) are dropped.
 * 5. Message strings are scrubbed and string format arguments censored; finally, every
 *    serialized line is scrubbed once more for bearer tokens and JWTs before it is written.
 *
 * Every string value loses JWTs, `Bearer`/`Basic` credentials, cellcds operator tokens and
 * e-mail addresses. Free text (messages, error messages and stacks) also loses quoted values,
 * ISO dates and runs of 4+ digits: all replaced by `[redacted]`.
 * Quoted values go because third-party error messages quote the input they choke on (JSON
 * parse errors, FHIRPath errors, SQL constraint errors). Unquoted free text in a third-party
 * message cannot be recognised: domain errors keep PHI out of their messages by design.
 */
import { pino, type Logger, type LoggerOptions as PinoOptions } from 'pino';

export type { Logger };

export const CENSOR = '[redacted]';

/** Paths pino censors wherever they appear in a log object (fast path; see also SENSITIVE_KEYS). */
export const REDACT_PATHS = [
  'authorization',
  'headers.authorization',
  'req.headers.authorization',
  'req.headers.cookie',
  'body',
  'req.body',
  'context',
  'prefetch',
  'fhirAuthorization',
  '*.fhirAuthorization',
  'access_token',
  '*.access_token',
  'token',
  '*.token',
  'jwt',
  'cards',
  '*.cards',
  'summary',
  'detail',
  '*.detail',
  'card',
  'resource',
  'patient',
  'err.body',
  'err.request',
  'err.response',
];

/**
 * Keys whose values are censored at any depth (compared case-insensitively, ignoring `-` and
 * `_`): payloads, FHIR data, card text, credentials.
 */
export const SENSITIVE_KEYS: ReadonlySet<string> = new Set(
  [
    'authorization',
    'proxy-authorization',
    'cookie',
    'set-cookie',
    'body',
    'rawBody',
    'payload',
    'context',
    'prefetch',
    'fhirAuthorization',
    'access_token',
    'refresh_token',
    'id_token',
    'token',
    'tokens',
    'jwt',
    'assertion',
    'client_assertion',
    'password',
    'secret',
    'apiKey',
    'privateKey',
    'cards',
    'card',
    'summary',
    'detail',
    'suggestions',
    'text',
    'resource',
    'resources',
    'entry',
    'bundle',
    'patient',
    'birthDate',
    'mrn',
    'identifier',
    'given',
    'family',
    'address',
    'telecom',
    'ssn',
    'email',
    'phone',
    'request',
    'response',
    'secretPayload',
  ].map(normalizeKey),
);

function normalizeKey(key: string): string {
  return key.toLowerCase().replace(/[-_]/g, '');
}

/**
 * Each pattern with a literal every match contains (or `undefined`): a string without it is
 * skipped without running the pattern (a 64-character hash costs the e-mail pattern ~2,000
 * steps of backtracking, on every log line).
 */
const SECRET_PATTERNS: ReadonlyArray<readonly [string | undefined, RegExp]> = [
  // JWS/JWE compact serializations (base64url JSON header starts with eyJ).
  ['eyJ', /eyJ[A-Za-z0-9_-]{2,}(?:\.[A-Za-z0-9_-]*){1,4}/g],
  // HTTP credentials.
  [undefined, /\b(?:Bearer|Basic|DPoP)\s+[A-Za-z0-9._~+/=-]+/gi],
  // cellcds operator tokens (`ccds_...`, `ccds_op_...`).
  ['ccds_', /\bccds_[A-Za-z0-9_-]{8,}/g],
  // e-mail addresses (contact data is PHI; never an operational field)
  ['@', /[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}/g],
];

const PHI_PATTERNS: readonly RegExp[] = [
  // quoted values: "...", '...', `...`, “...”
  /"[^"\n]{1,2000}"|'[^'\n]{1,2000}'|`[^`\n]{1,2000}`|“[^”\n]{1,2000}”/g,
  // ISO dates (birth dates) and date-times
  /\b\d{4}-\d{2}-\d{2}(?:T[0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?)?\b/g,
  // runs of 4+ digits (MRNs, SSNs, phone numbers), also inside identifiers like MRN-00123456
  /\d{4,}/g,
];

/** Removes bearer tokens, JWTs, operator tokens and e-mail addresses from any text. */
export function scrubSecrets(text: string): string {
  let out = text;
  for (const [literal, re] of SECRET_PATTERNS) {
    if (literal === undefined || out.includes(literal)) {
      out = out.replace(re, CENSOR);
    }
  }
  return out;
}

/** `scrubSecrets`, plus the PHI-shaped parts of free text (quoted values, digit runs, dates). */
export function scrubText(text: string): string {
  let out = scrubSecrets(text);
  for (const re of PHI_PATTERNS) {
    out = out.replace(re, CENSOR);
  }
  return out;
}

const STACK_FRAME = /^\s+at\s/;

/** Keeps the stack frames (code locations); the header lines repeat the message, so they are rebuilt. */
function scrubStack(stack: string, type: string, message: string): string {
  const frames = stack
    .split('\n')
    .filter((line) => STACK_FRAME.test(line))
    // Frames name files and functions; a path can still carry a token in a URL (file://...?t=).
    .map((line) => scrubSecrets(line));
  return [`${type}: ${message}`, ...frames].join('\n');
}

const MAX_DEPTH = 8;
const MAX_KEYS = 100;
const MAX_ARRAY = 100;
const MAX_STRING = 4096;

/**
 * Serializes an error for a log line: type, scrubbed message and stack, and a few safe
 * scalar fields; the cause chain is serialized the same way. Nothing else of the error.
 */
export function serializeError(err: unknown, depth = 0): Record<string, unknown> {
  if (typeof err !== 'object' || err === null) {
    return { type: typeof err };
  }
  // An Error, or an error already turned into a plain object (by the log formatter, which
  // runs first, or by a caller's `{ type, message, stack }`): both get the same treatment.
  const fields = err as Record<string, unknown>;
  const rawType = err instanceof Error ? err.name : (fields.type ?? fields.name);
  const type = typeof rawType === 'string' && rawType ? scrubText(rawType.slice(0, 64)) : 'Error';
  // `message` can be anything at run time (`err.message = {...}`).
  const rawMessage = fields.message;
  const message = scrubText(
    (typeof rawMessage === 'string' ? rawMessage : '').slice(0, MAX_STRING),
  );
  const out: Record<string, unknown> = { type, message };
  if (typeof fields.stack === 'string') {
    out.stack = scrubStack(fields.stack, type, message);
  }
  for (const key of ['code', 'status', 'statusCode', 'reason', 'field', 'errno', 'syscall']) {
    const v = fields[key];
    if (typeof v === 'number' && Number.isFinite(v)) {
      out[key] = v;
    } else if (typeof v === 'string' && v.length <= 128) {
      out[key] = scrubText(v);
    }
  }
  if (fields.cause !== undefined && depth < 4) {
    out.cause = serializeError(fields.cause, depth + 1);
  }
  if (Array.isArray(fields.errors) && depth < 4) {
    out.errors = (fields.errors as unknown[])
      .slice(0, 10)
      .map((e: unknown) => serializeError(e, depth + 1));
  }
  return out;
}

/**
 * Returns a copy of `value` safe to log: sensitive keys censored at any depth, errors
 * serialized, secrets scrubbed from strings, cycles and depth cut.
 */
export function sanitizeForLog(value: unknown, depth = 0, seen = new WeakSet<object>()): unknown {
  switch (typeof value) {
    case 'string':
      return scrubSecrets(value.length > MAX_STRING ? `${value.slice(0, MAX_STRING)}…` : value);
    case 'number':
    case 'boolean':
    case 'undefined':
      return value;
    case 'bigint':
      return value.toString();
    case 'symbol':
    case 'function':
      return undefined;
    case 'object':
      break;
  }
  if (value === null) {
    return null;
  }
  if (value instanceof Error) {
    return serializeError(value);
  }
  if (value instanceof Date) {
    return Number.isNaN(value.getTime()) ? null : value.toISOString();
  }
  if (Buffer.isBuffer(value) || ArrayBuffer.isView(value)) {
    return `[${value.byteLength} bytes]`;
  }
  if (seen.has(value)) {
    return '[circular]';
  }
  if (depth >= MAX_DEPTH) {
    return '[truncated]';
  }
  seen.add(value);
  try {
    if (Array.isArray(value)) {
      return value.slice(0, MAX_ARRAY).map((v: unknown) => sanitizeForLog(v, depth + 1, seen));
    }
    if (value instanceof Map) {
      return sanitizeForLog(Object.fromEntries(value), depth, seen);
    }
    if (value instanceof Set) {
      return sanitizeForLog([...value], depth, seen);
    }
    const out: Record<string, unknown> = {};
    let n = 0;
    for (const [key, v] of Object.entries(value)) {
      if (n++ >= MAX_KEYS) {
        out['…'] = '[truncated]';
        break;
      }
      out[key] = SENSITIVE_KEYS.has(normalizeKey(key))
        ? CENSOR
        : sanitizeForLog(v, depth + 1, seen);
    }
    return out;
  } finally {
    seen.delete(value);
  }
}

function sanitizeObject(obj: object): Record<string, unknown> {
  const out = sanitizeForLog(obj);
  return typeof out === 'object' && out !== null && !Array.isArray(out)
    ? (out as Record<string, unknown>)
    : {};
}

export interface LoggerOptions {
  level?: string;
  /** Where lines go (tests capture them). Default: stdout. */
  destination?: { write(line: string): void };
  base?: Record<string, string>;
}

type ChildFn = (this: Logger, bindings: Record<string, unknown>, options?: unknown) => Logger;

/**
 * Message and format arguments of a log call: the message is scrubbed; string format
 * arguments (`log.info('user %s', value)`) are censored outright, since interpolation would
 * carry values past the key-based redaction; an error's message becomes the line's message
 * only after scrubbing.
 */
function cleanArgs(args: unknown[]): unknown[] {
  const [first, ...rest] = args;
  if (typeof first === 'string') {
    return [scrubText(first), ...rest.map(censorFormatArg)];
  }
  if (rest.length === 0) {
    if (first instanceof Error) {
      return [first, scrubText(first.message)];
    }
    const err = (first as { err?: unknown } | null | undefined)?.err;
    if (err instanceof Error && (first as { msg?: unknown }).msg === undefined) {
      return [first, scrubText(err.message)];
    }
    return args;
  }
  const [msg, ...formatArgs] = rest;
  return [
    first,
    typeof msg === 'string' ? scrubText(msg) : msg,
    ...formatArgs.map(censorFormatArg),
  ];
}

function censorFormatArg(arg: unknown): unknown {
  if (typeof arg === 'number' || typeof arg === 'boolean') {
    return arg;
  }
  return typeof arg === 'object' && arg !== null ? sanitizeForLog(arg) : CENSOR;
}

/**
 * Creates the process logger. Every line carries `app`, and the given base fields (`region`);
 * request handlers add `requestId` and `tenant` through a child logger.
 */
export function createLogger(opts: LoggerOptions = {}): Logger {
  const options: PinoOptions = {
    level: opts.level ?? 'info',
    base: { app: 'cellcds', ...opts.base },
    redact: { paths: REDACT_PATHS, censor: CENSOR },
    timestamp: pino.stdTimeFunctions.isoTime,
    serializers: { err: serializeError, error: serializeError },
    formatters: {
      level: (label: string) => ({ level: label }),
      bindings: (bindings) => sanitizeObject(bindings),
      log: (obj) => sanitizeObject(obj),
    },
    hooks: {
      logMethod(args, method) {
        method.apply(this, cleanArgs(args) as Parameters<typeof method>);
      },
      // The last layer: the serialized line, whatever path a value took into it.
      streamWrite: (line: string) => scrubSecrets(line),
    },
  };
  const logger = opts.destination
    ? pino(options, opts.destination)
    : pino(options, pino.destination({ dest: 1, sync: true }));
  // pino applies `formatters.bindings` to the root only. Child loggers are created with
  // `Object.create(parent)`, so they (and their children) inherit this own `child`.
  const inherited = (logger as unknown as { child: ChildFn }).child;
  Object.defineProperty(logger, 'child', {
    value: function child(this: Logger, bindings: Record<string, unknown>, childOptions?: unknown) {
      return inherited.call(this, sanitizeObject(bindings), childOptions);
    },
    writable: true,
    configurable: true,
  });
  return logger;
}
