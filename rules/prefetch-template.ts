/**
 * CDS Hooks 2.0 prefetch template syntax. Lives in rules/ because pack validation needs it
 * and rules/ may not import hooks/; hooks/ uses it for resolution.
 *
 * A template is a relative FHIR read (`Type/id`) or type-level search (`Type?query`) whose
 * tokens are `{{context.<field>}}` (root, primitive context fields) or one of the four 2.0
 * user tokens (CDS Hooks 2.0 "Prefetch tokens"). The 3.0-ballot FHIRPath tokens
 * (`{{today() - 90 days}}`, `{{context.draftOrders.entry...}}`) are refused: a 2.0 client
 * need not understand them.
 */
import { isR4ResourceType } from '../fhir-profiles/index.ts';
import { PackValidationError } from './errors.ts';

type Token = { kind: 'context'; field: string } | { kind: 'user'; resourceType: string };
type Part = string | Token;

/** The 2.0 user tokens and the `context.userId` resource type each one expands from. */
const USER_TOKENS: Readonly<Record<string, string>> = {
  userPractitionerId: 'Practitioner',
  userPractitionerRoleId: 'PractitionerRole',
  userPatientId: 'Patient',
  userRelatedPersonId: 'RelatedPerson',
};

/**
 * Root context fields of the library hooks that hold objects or arrays, never prefetch tokens
 * (order-sign/order-select `draftOrders`, `selections`; appointment-book `appointments`;
 * the retired medication-prescribe `medications`, order-review `orders`).
 */
const NON_TOKEN_CONTEXT_FIELDS: ReadonlySet<string> = new Set([
  'draftOrders',
  'selections',
  'appointments',
  'medications',
  'orders',
]);

const MAX_TEMPLATE_LENGTH = 2048;
const TOKEN_RE = /\{\{([^{}]*)\}\}/g;
const CONTEXT_FIELD_RE = /^context\.([A-Za-z][A-Za-z0-9_]*)$/;
/** FHIR `id`: 1-64 of `[A-Za-z0-9\-.]` (R4 id datatype). */
const FHIR_ID_RE = /^[A-Za-z0-9\-.]{1,64}$/;
/** A relative reference as CDS Hooks puts in `context.userId` (library invariant ord-1). */
const USER_REF_RE = /^([A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})$/;
const PARAM_NAME_RE = /^[A-Za-z_][A-Za-z0-9_\-.:]*$/;
/** Query literal: no whitespace, controls, `#`, braces; `%` only as a valid escape. */
const QUERY_LITERAL_RE = /^(?:[^\s#{}%\u0000-\u001f\u007f]|%[0-9A-Fa-f]{2})*$/;

function parseToken(raw: string): Token | string {
  const body = raw.trim();
  const context = CONTEXT_FIELD_RE.exec(body);
  if (context?.[1] !== undefined) {
    const field = context[1];
    if (NON_TOKEN_CONTEXT_FIELDS.has(field)) {
      return `'{{${body}}}' is not a prefetch token: only root primitive context fields are`;
    }
    return { kind: 'context', field };
  }
  const userType = Object.hasOwn(USER_TOKENS, body) ? USER_TOKENS[body] : undefined;
  if (userType !== undefined) {
    return { kind: 'user', resourceType: userType };
  }
  if (body.startsWith('context.')) {
    return `'{{${body}}}' is not a CDS Hooks 2.0 prefetch token: nested context paths are not allowed`;
  }
  return `'{{${body}}}' is not a CDS Hooks 2.0 prefetch token (FHIRPath tokens are 3.0-ballot only)`;
}

/** Splits a template into literal text and tokens, checking each token. */
function tokenize(template: string): Part[] | string {
  const parts: Part[] = [];
  let last = 0;
  for (const match of template.matchAll(TOKEN_RE)) {
    if (match.index > last) {
      parts.push(template.slice(last, match.index));
    }
    const token = parseToken(match[1] ?? '');
    if (typeof token === 'string') {
      return token;
    }
    parts.push(token);
    last = match.index + match[0].length;
  }
  if (last < template.length) {
    parts.push(template.slice(last));
  }
  for (const part of parts) {
    if (typeof part === 'string' && (part.includes('{') || part.includes('}'))) {
      return 'unbalanced or empty {{ }} token';
    }
  }
  return parts;
}

function isUserIdToken(part: Part | undefined): boolean {
  return typeof part === 'object' && part.kind === 'context' && part.field === 'userId';
}

/** Checks the URL shape of a tokenized template: `Type`, `Type/id` or `Type?name=value&...`. */
function checkShape(parts: Part[]): string | undefined {
  // `{{context.userId}}` alone is a read: it already holds `Type/id`.
  if (parts.length === 1 && isUserIdToken(parts[0])) {
    return undefined;
  }
  const first = parts[0];
  if (typeof first !== 'string') {
    return 'must start with a FHIR resource type';
  }
  const match = /^([^/?]*)([/?]?)(.*)$/s.exec(first);
  const resourceType = match?.[1] ?? '';
  const separator = match?.[2] ?? '';
  const rest = [match?.[3] ?? '', ...parts.slice(1)];
  if (/^[a-z][a-z0-9+.-]*:/i.test(first) || first.startsWith('/')) {
    return 'must be a relative FHIR URL (no scheme, no leading slash)';
  }
  if (!isR4ResourceType(resourceType)) {
    return `'${resourceType}' is not a FHIR R4 resource type`;
  }
  if (separator === '') {
    return rest.length === 1 && rest[0] === '' ? undefined : 'must be a read or a search URL';
  }
  if (separator === '/') {
    return checkReadId(rest);
  }
  return checkQuery(rest);
}

function checkReadId(rest: Part[]): string | undefined {
  const nonEmpty = rest.filter((p) => p !== '');
  const only = nonEmpty[0];
  if (nonEmpty.length !== 1 || only === undefined) {
    return 'a read must be Type/id with one literal id or one token';
  }
  if (typeof only === 'string') {
    return FHIR_ID_RE.test(only) && only !== '.' && only !== '..'
      ? undefined
      : `'${only}' is not a FHIR id (reads may not have sub-paths, operations or queries)`;
  }
  return isUserIdToken(only)
    ? '{{context.userId}} holds Type/id: use it as the whole template or a query value'
    : undefined;
}

function checkQuery(rest: Part[]): string | undefined {
  // Tokens become a placeholder value; the literal text must form name=value pairs.
  const query = rest.map((p) => (typeof p === 'string' ? p : 'TOKEN')).join('');
  if (query === '') {
    return undefined;
  }
  for (const pair of query.split('&')) {
    const eq = pair.indexOf('=');
    const name = eq < 0 ? pair : pair.slice(0, eq);
    const value = eq < 0 ? '' : pair.slice(eq + 1);
    if (!PARAM_NAME_RE.test(name)) {
      return `'${name}' is not a search parameter name`;
    }
    if (value === '') {
      return `search parameter '${name}' has no value`;
    }
    if (!QUERY_LITERAL_RE.test(value)) {
      return `search parameter '${name}' has a value with whitespace, '#' or a bad %-escape`;
    }
  }
  return undefined;
}

function parseTemplate(template: unknown): Part[] | string {
  if (typeof template !== 'string' || template === '') {
    return 'must be a non-empty string';
  }
  if (template.length > MAX_TEMPLATE_LENGTH) {
    return `is longer than ${MAX_TEMPLATE_LENGTH} characters`;
  }
  const parts = tokenize(template);
  if (typeof parts === 'string') {
    return parts;
  }
  const literals = parts.filter((p): p is string => typeof p === 'string').join('');
  if (/[\s#\u0000-\u001f\u007f]/.test(literals)) {
    return 'must not contain whitespace, control characters or a fragment (#)';
  }
  return checkShape(parts) ?? parts;
}

/**
 * Checks a template uses only 2.0 tokens: `{{context.<name>}}` and `{{userPractitionerId}}`,
 * `{{userPractitionerRoleId}}`, `{{userPatientId}}`, `{{userRelatedPersonId}}`, and is a
 * relative FHIR read or search URL.
 * @returns a problem message, or undefined if the template is valid.
 */
export function checkPrefetchTemplate(template: string): string | undefined {
  const parts = parseTemplate(template);
  return typeof parts === 'string' ? parts : undefined;
}

/**
 * Characters a rendered URL keeps as written: those RFC 3986 (§3.3, §3.4) allows in a path or
 * a query, `unreserved / sub-delims / ":" / "@" / "/" / "?"`, except `+`, which servers decode
 * as a space in a query (application/x-www-form-urlencoded; FHIR asks for `%2B`). So `&`, `=`
 * and the `,` OR-separator keep the query's structure.
 */
const URL_SAFE_RE = /^[A-Za-z0-9\-._~!$&'()*,;=:@/?]$/;
const PERCENT_ESCAPE_RE = /^%[0-9A-Fa-f]{2}/;
const utf8 = new TextEncoder();

/**
 * Percent-encodes (UTF-8) what a template's literal text may not hold raw in a URL: `|` of
 * `system|code` tokens (default Tomcat, under HAPI FHIR, answers 400 to a raw one), `[`, `]`,
 * `^`, `"`, non-ASCII, `+`. An escape the pack author wrote (`%7C`) is kept, never encoded
 * again; a `%` that starts none (template checks refuse it) becomes `%25`.
 */
function encodeLiteral(text: string): string {
  let out = '';
  let i = 0;
  while (i < text.length) {
    const escape = text[i] === '%' ? PERCENT_ESCAPE_RE.exec(text.slice(i, i + 3)) : null;
    if (escape) {
      out += escape[0];
      i += 3;
      continue;
    }
    const codePoint = text.codePointAt(i) ?? 0;
    const char = String.fromCodePoint(codePoint);
    // A lone surrogate reads as one unit and encodes as U+FFFD (TextEncoder), never throws.
    i += codePoint > 0xffff ? 2 : 1;
    out += URL_SAFE_RE.test(char) ? char : percentEncode(char);
  }
  return out;
}

function percentEncode(char: string): string {
  let out = '';
  for (const byte of utf8.encode(char)) {
    out += `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

function encodeUserId(value: string): string | undefined {
  const ref = USER_REF_RE.exec(value);
  if (!ref?.[1] || !ref[2] || ref[2] === '.' || ref[2] === '..') {
    return undefined;
  }
  return `${encodeURIComponent(ref[1])}/${encodeURIComponent(ref[2])}`;
}

/**
 * A token's value in a context: the URL-encoded text, `absent` when the context does not have
 * it (an optional field not sent, or a user token for another kind of user), or `unusable`
 * when it is there but cannot go into a URL (empty, `.`/`..`, an object, a malformed userId).
 */
function tokenValue(
  token: Token,
  context: Record<string, unknown>,
): { value: string } | 'absent' | 'unusable' {
  if (token.kind === 'user') {
    const userId = Object.hasOwn(context, 'userId') ? context.userId : undefined;
    if (userId === undefined || userId === null) {
      return 'absent';
    }
    const ref = typeof userId === 'string' ? USER_REF_RE.exec(userId) : null;
    if (!ref?.[1] || !ref[2] || ref[2] === '.' || ref[2] === '..') {
      return 'unusable';
    }
    return ref[1] === token.resourceType ? { value: encodeURIComponent(ref[2]) } : 'absent';
  }
  // Own properties only: `{{context.constructor}}` must not reach Object.prototype.
  const value = Object.hasOwn(context, token.field) ? context[token.field] : undefined;
  if (value === undefined || value === null) {
    return 'absent';
  }
  if (typeof value === 'number' || typeof value === 'boolean') {
    // `1e+21`: its `+` would be read as a space.
    return { value: encodeURIComponent(String(value)) };
  }
  if (typeof value !== 'string' || value === '' || value === '.' || value === '..') {
    return 'unusable';
  }
  const encoded = token.field === 'userId' ? encodeUserId(value) : encodeURIComponent(value);
  return encoded === undefined ? 'unusable' : { value: encoded };
}

/** Templates kept parsed, with their literal text already encoded, at most (oldest out first). */
const MAX_COMPILED_TEMPLATES = 512;
const compiledTemplates = new Map<string, readonly Part[] | string>();

/**
 * A template parsed and checked once, its literal parts URL-encoded (`encodeLiteral`), or its
 * problem: a service's few templates are rendered on every call that lacks their prefetch, so
 * they are not parsed again each time. Templates come from packs (a bounded set); the cache is
 * bounded anyway, so a stream of distinct templates costs a re-parse, never memory.
 */
function compiledTemplate(template: string): readonly Part[] | string {
  const hit = compiledTemplates.get(template);
  if (hit !== undefined) {
    return hit;
  }
  const parsed = parseTemplate(template);
  const compiled =
    typeof parsed === 'string'
      ? parsed
      : Object.freeze(
          parsed.map((p) => (typeof p === 'string' ? encodeLiteral(p) : Object.freeze({ ...p }))),
        );
  if (compiledTemplates.size >= MAX_COMPILED_TEMPLATES) {
    const oldest = compiledTemplates.keys().next();
    if (oldest.done !== true) {
      compiledTemplates.delete(oldest.value);
    }
  }
  compiledTemplates.set(template, compiled);
  return compiled;
}

/** A rendered template, or why it could not be rendered (see {@link renderPrefetchTemplateOrGap}). */
export type RenderedPrefetch = { url: string } | { gap: 'absent' | 'unusable' };

/**
 * Fills a template's tokens from the hook context (root primitive fields only) and
 * `context.userId` (`Practitioner/123` -> userPractitionerId = 123). Values are URL-encoded,
 * and so is the template's literal text where RFC 3986 does not allow it raw (`|` -> `%7C`;
 * `&`, `=`, `,` and the author's own `%XX` escapes are kept).
 * @returns the relative URL, or undefined if a token has no usable value in this context.
 * @throws PackValidationError (path `prefetch`) if the template itself is invalid
 *   (see {@link checkPrefetchTemplate}); packs are validated at load, so this means a bug.
 */
export function renderPrefetchTemplate(
  template: string,
  context: Record<string, unknown>,
): string | undefined {
  const rendered = renderPrefetchTemplateOrGap(template, context);
  return 'url' in rendered ? rendered.url : undefined;
}

/**
 * {@link renderPrefetchTemplate}, telling why a template could not be filled: `absent` when a
 * token's value is not in this context at all (an optional field such as `encounterId` not
 * sent, or `{{userPractitionerRoleId}}` while the user is a Practitioner): the query does not
 * apply to this call, so there is no data for it; `unusable` when a value is there but cannot
 * be put into a URL (takes precedence over `absent`).
 * @throws PackValidationError as renderPrefetchTemplate does.
 */
export function renderPrefetchTemplateOrGap(
  template: string,
  context: Record<string, unknown>,
): RenderedPrefetch {
  const parts = compiledTemplate(template);
  if (typeof parts === 'string') {
    throw new PackValidationError([{ path: 'prefetch', message: parts }]);
  }
  let url = '';
  let absent = false;
  for (const part of parts) {
    if (typeof part === 'string') {
      url += part;
      continue;
    }
    const value = tokenValue(part, context);
    if (value === 'unusable') {
      return { gap: 'unusable' };
    }
    if (value === 'absent') {
      absent = true;
      continue;
    }
    url += value.value;
  }
  return absent ? { gap: 'absent' } : { url };
}
