/**
 * Structured JSON logging (pino). Redaction is configured here and only here: request
 * bodies, hook context, prefetch, tokens, Authorization headers and card text never reach a
 * log line. Code logs ids and counts, never payloads; redaction is the safety net.
 */
import { pino, type Logger } from 'pino';

export type { Logger };

/** Paths pino censors wherever they appear in a log object. */
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

export interface LoggerOptions {
  level?: string;
  /** Where lines go (tests capture them). Default: stdout. */
  destination?: { write(line: string): void };
  base?: Record<string, string>;
}

/** Creates the process logger. Every line carries `region` and the given base fields. */
export function createLogger(opts: LoggerOptions = {}): Logger {
  const options = {
    level: opts.level ?? 'info',
    base: { app: 'cellcds', ...opts.base },
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label: string) => ({ level: label }) },
  };
  return opts.destination ? pino(options, opts.destination) : pino(options);
}
