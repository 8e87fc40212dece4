/** A hook request or feedback body is malformed. HTTP: 400, naming the field. */
export class HookRequestError extends Error {
  /** JSON path of the offending field, e.g. `context.userId`. */
  readonly field: string;
  constructor(field: string, message: string) {
    super(`${field}: ${message}`);
    this.name = new.target.name;
    this.field = field;
  }
}

/**
 * Required prefetch data could not be obtained (no fhirServer, server not allowlisted,
 * timeout, OperationOutcome, too large...). HTTP: 412 with `operationOutcome` as the body.
 */
export class PrefetchError extends Error {
  readonly key: string;
  readonly reason:
    'missing' | 'not-allowed' | 'timeout' | 'failed' | 'too-large' | 'operation-outcome';
  readonly operationOutcome: Record<string, unknown>;
  constructor(key: string, reason: PrefetchError['reason'], message: string) {
    super(message);
    this.name = new.target.name;
    this.key = key;
    this.reason = reason;
    this.operationOutcome = {
      resourceType: 'OperationOutcome',
      issue: [
        {
          severity: 'error',
          code: reason === 'timeout' ? 'timeout' : 'processing',
          diagnostics: message,
        },
      ],
    };
  }
}
