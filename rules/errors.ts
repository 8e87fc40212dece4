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
