/**
 * FHIR profiles the service relies on and their validators. Imports nothing of ours.
 */

export interface ProfileProblem {
  /** Path inside the validated resource, e.g. `action[0].condition[0].expression.language`. */
  path: string;
  message: string;
}

/** Validates a FHIR R4 resource against the base R4 definitions (@medplum/core's validator). */
export function validateFhirResource(_resource: unknown): ProfileProblem[] {
  throw new Error('not implemented');
}

/** Validates a PlanDefinition against the cellcds rule-pack PlanDefinition profile. */
export function validateRulePackPlanDefinition(_resource: unknown): ProfileProblem[] {
  throw new Error('not implemented');
}
