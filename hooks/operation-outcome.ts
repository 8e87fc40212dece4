/**
 * FHIR OperationOutcome bodies for non-2xx hook responses (412 per CDS Hooks 2.0; the 3.0
 * ballot asks for one on every non-2xx).
 */

/**
 * A one-issue OperationOutcome with severity `error`.
 * @param message safe text (no PHI, no secrets): it goes to the client as `diagnostics`.
 * @param code FHIR issue type; default `processing`.
 */
export function operationOutcome(message: string, code = 'processing'): Record<string, unknown> {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity: 'error', code, diagnostics: message }],
  };
}
