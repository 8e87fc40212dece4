import type { PackProblem } from './types.ts';

/**
 * A pack failed validation (schema, FHIRPath, card limits, embedded tests). HTTP: 422.
 * `problems` holds real problems only; where only the first ones are kept (YAML syntax errors,
 * which can run to thousands after one mistake), `total` counts every one found and the
 * message says how many are shown: `rule pack is invalid: 5968 problem(s), first 5 shown`.
 */
export class PackValidationError extends Error {
  readonly problems: PackProblem[];
  /** How many problems were found: `problems.length`, or more when only the first were kept. */
  readonly total: number;
  constructor(problems: PackProblem[], opts: { total?: number } = {}) {
    const total = Math.max(problems.length, opts.total ?? 0);
    const shown = total > problems.length ? `, first ${problems.length} shown` : '';
    super(`rule pack is invalid: ${total} problem(s)${shown}`);
    this.name = new.target.name;
    this.problems = problems;
    this.total = total;
  }
}

/** A pack was asked to evaluate a service it does not offer. HTTP: 404. */
export class UnknownServiceError extends Error {
  readonly serviceId: string;
  constructor(serviceId: string) {
    super('the pack has no such service');
    this.name = new.target.name;
    this.serviceId = serviceId;
  }
}

/** Which limit of a pack's validation worker was hit. */
export type PackCheckLimit = 'time' | 'memory';

/**
 * A pack's validation, run in a worker of its own, overran a limit: its wall-clock time or its
 * heap. The pack is refused like an invalid one (HTTP: 422), with one problem at `(pack)` that
 * names the limit, e.g. `validating the pack took more than 20 s ...`.
 */
export class PackLimitError extends PackValidationError {
  readonly limit: PackCheckLimit;
  constructor(limit: PackCheckLimit, message: string) {
    super([{ path: '(pack)', message }]);
    this.message = `rule pack refused: its validation exceeded the ${limit} limit`;
    this.limit = limit;
  }
}

/**
 * A pack could not be validated for a reason of the server's, not the pack's (its validation
 * worker did not start, or stopped without an answer). HTTP: 503, try again.
 */
export class PackCheckUnavailableError extends Error {
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, { cause: opts.cause });
    this.name = new.target.name;
  }
}
