/**
 * CDS Hooks 2.0 prefetch template syntax. Lives in rules/ because pack validation needs it
 * and rules/ may not import hooks/; hooks/ uses it for resolution.
 */

/**
 * Checks a template uses only 2.0 tokens: `{{context.<name>}}` and `{{userPractitionerId}}`,
 * `{{userPractitionerRoleId}}`, `{{userPatientId}}`, `{{userRelatedPersonId}}`, and is a
 * relative FHIR read or search URL.
 * @returns a problem message, or undefined if the template is valid.
 */
export function checkPrefetchTemplate(_template: string): string | undefined {
  throw new Error('not implemented');
}

/**
 * Fills a template's tokens from the hook context (root primitive fields only) and
 * `context.userId` (`Practitioner/123` -> userPractitionerId = 123). Values are URL-encoded.
 * @returns the relative URL, or undefined if a token has no value in this context.
 */
export function renderPrefetchTemplate(
  _template: string,
  _context: Record<string, unknown>,
): string | undefined {
  throw new Error('not implemented');
}
