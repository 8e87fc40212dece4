import type { PackProblem } from './types.ts';

/** A pack failed validation (schema, FHIRPath, card limits, embedded tests). HTTP: 422. */
export class PackValidationError extends Error {
  readonly problems: PackProblem[];
  constructor(problems: PackProblem[]) {
    super(`rule pack is invalid: ${problems.length} problem(s)`);
    this.name = new.target.name;
    this.problems = problems;
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
