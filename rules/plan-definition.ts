/**
 * Rule packs authored as a FHIR R4 `eca-rule` PlanDefinition, converted into the internal
 * `RulePack` form. The PlanDefinition must conform to the cellcds rule-pack profile
 * (fhir-profiles/StructureDefinition-cellcds-rule-pack-plandefinition.json); see
 * rules/README.md "PlanDefinition packs" for the full mapping.
 */
import {
  CDS_SERVICE_EXTENSION,
  OVERRIDE_REASON_EXTENSION,
  RULE_PACK_IDENTIFIER_SYSTEM,
  validateRulePackPlanDefinition,
} from '../fhir-profiles/index.ts';
import { PackValidationError } from './errors.ts';
import { checkPrefetchTemplate } from './prefetch-template.ts';
import type {
  ActionTemplate,
  CardTemplate,
  CdsCoding,
  Indicator,
  LinkTemplate,
  PackProblem,
  PackRule,
  PackService,
  PackValueSet,
  RulePack,
  SuggestionTemplate,
} from './types.ts';

type Json = Record<string, unknown>;

/** The FHIR core extension for named expressions: the pack's `let` entries. */
const VARIABLE_EXTENSION = 'http://hl7.org/fhir/StructureDefinition/variable';
const FHIRPATH = 'text/fhirpath';
const HOOKS: ReadonlySet<string> = new Set(['patient-view', 'order-select', 'order-sign']);

/** PlanDefinition action priority -> card indicator (issue 3). */
const INDICATOR: Readonly<Record<string, Indicator>> = {
  routine: 'info',
  urgent: 'warning',
  asap: 'critical',
  stat: 'critical',
};

/** PlanDefinition action type (http://terminology.hl7.org/CodeSystem/action-type) -> CDS action. */
const ACTION_TYPE: Readonly<Record<string, ActionTemplate['type']>> = {
  create: 'create',
  update: 'update',
  remove: 'delete',
};

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function list(value: unknown): Json[] {
  return Array.isArray(value) ? value.filter(isObject) : [];
}

function str(value: unknown): string | undefined {
  return typeof value === 'string' && value !== '' ? value : undefined;
}

/** `MedicationSafety`, `medication_safety`, `Medication Safety` -> `medication-safety`. */
function toKebab(name: string): string {
  return name
    .replace(/([a-z0-9])([A-Z])/g, '$1-$2')
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, '-')
    .replace(/^-+|-+$/g, '');
}

/** Collects problems with their PlanDefinition paths while the conversion goes on. */
class Problems {
  readonly items: PackProblem[] = [];
  add(path: string, message: string): void {
    this.items.push({ path, message });
  }
}

interface Context {
  resource: Json;
  contained: Map<string, Json>;
  problems: Problems;
}

function packId(resource: Json): string {
  const identifier = list(resource.identifier).find(
    (i) => i.system === RULE_PACK_IDENTIFIER_SYSTEM,
  );
  const fromIdentifier = str(identifier?.value);
  return fromIdentifier ?? toKebab(str(resource.name) ?? '');
}

function subExtensions(
  ext: Json,
  path: string,
  problems: Problems,
  allowed: string[],
): Map<string, Array<[Json, string]>> {
  const out = new Map<string, Array<[Json, string]>>();
  list(ext.extension).forEach((sub, i) => {
    const url = str(sub.url) ?? '';
    const subPath = `${path}.extension[${i}]`;
    if (!allowed.includes(url)) {
      problems.add(subPath, `unknown ${CDS_SERVICE_EXTENSION} part '${url}'`);
      return;
    }
    out.set(url, [...(out.get(url) ?? []), [sub, subPath]]);
  });
  return out;
}

function single(
  parts: Map<string, Array<[Json, string]>>,
  url: string,
  valueKey: string,
  problems: Problems,
): string | undefined {
  const found = parts.get(url) ?? [];
  const [first, second] = found;
  if (second) {
    problems.add(second[1], `only one '${url}' is allowed`);
  }
  if (!first) {
    return undefined;
  }
  const value = str(first[0][valueKey]);
  if (value === undefined) {
    problems.add(first[1], `'${url}' needs a ${valueKey}`);
  }
  return value;
}

/** Services declared with the cds-service extension, keyed by hook. */
function declaredServices(ctx: Context, id: string): Map<string, PackService> {
  const services = new Map<string, PackService>();
  list(ctx.resource.extension).forEach((ext, i) => {
    if (ext.url !== CDS_SERVICE_EXTENSION) {
      return;
    }
    const path = `extension[${i}]`;
    const parts = subExtensions(ext, path, ctx.problems, [
      'hook',
      'id',
      'title',
      'description',
      'usageRequirements',
      'prefetch',
    ]);
    const hook = single(parts, 'hook', 'valueCode', ctx.problems);
    if (hook === undefined) {
      ctx.problems.add(path, `a ${CDS_SERVICE_EXTENSION} extension needs a 'hook'`);
      return;
    }
    if (!HOOKS.has(hook)) {
      ctx.problems.add(`${path}.hook`, `unsupported hook '${hook}'`);
    }
    if (services.has(hook)) {
      ctx.problems.add(path, `a second service for hook '${hook}' (one service per hook)`);
      return;
    }
    const service: PackService = {
      id: single(parts, 'id', 'valueId', ctx.problems) ?? `${id}-${hook}`,
      hook,
      description:
        single(parts, 'description', 'valueString', ctx.problems) ??
        str(ctx.resource.description) ??
        '',
    };
    const title = single(parts, 'title', 'valueString', ctx.problems);
    if (title !== undefined) {
      service.title = title;
    }
    const usage = single(parts, 'usageRequirements', 'valueString', ctx.problems);
    if (usage !== undefined) {
      service.usageRequirements = usage;
    }
    const prefetch: Record<string, string> = {};
    for (const [part, partPath] of parts.get('prefetch') ?? []) {
      const kv = subExtensions(part, partPath, ctx.problems, ['key', 'template']);
      const key = single(kv, 'key', 'valueString', ctx.problems);
      const template = single(kv, 'template', 'valueString', ctx.problems);
      if (key === undefined || template === undefined) {
        ctx.problems.add(partPath, "a prefetch part needs a 'key' and a 'template'");
        continue;
      }
      if (Object.hasOwn(prefetch, key)) {
        ctx.problems.add(partPath, `duplicate prefetch key '${key}'`);
      }
      const problem = checkPrefetchTemplate(template);
      if (problem !== undefined) {
        ctx.problems.add(partPath, `prefetch '${key}': ${problem}`);
      }
      Object.defineProperty(prefetch, key, { value: template, enumerable: true, writable: true });
    }
    if (Object.keys(prefetch).length > 0) {
      service.prefetch = prefetch;
    }
    services.set(hook, service);
  });
  return services;
}

function letExpressions(ctx: Context): Record<string, string> | undefined {
  const out: Record<string, string> = {};
  list(ctx.resource.extension).forEach((ext, i) => {
    if (ext.url !== VARIABLE_EXTENSION) {
      return;
    }
    const path = `extension[${i}].valueExpression`;
    const expr = isObject(ext.valueExpression) ? ext.valueExpression : {};
    const name = str(expr.name);
    const expression = str(expr.expression);
    if (expr.language !== FHIRPATH) {
      ctx.problems.add(`${path}.language`, `must be ${FHIRPATH}`);
    }
    if (name === undefined || expression === undefined) {
      ctx.problems.add(path, 'a variable needs a name and an expression');
      return;
    }
    if (Object.hasOwn(out, name)) {
      ctx.problems.add(`${path}.name`, `duplicate variable '${name}'`);
    }
    Object.defineProperty(out, name, { value: expression, enumerable: true, writable: true });
  });
  return Object.keys(out).length > 0 ? out : undefined;
}

function expansionCodes(contains: unknown, out: PackValueSet['codes']): void {
  for (const item of list(contains)) {
    const system = str(item.system);
    const code = str(item.code);
    if (system !== undefined && code !== undefined) {
      const display = str(item.display);
      out.push(display === undefined ? { system, code } : { system, code, display });
    }
    expansionCodes(item.contains, out);
  }
}

/** Contained ValueSets (expansion.contains, or compose.include.concept), keyed by name or id. */
function valueSets(ctx: Context): Record<string, PackValueSet> | undefined {
  const out: Record<string, PackValueSet> = {};
  list(ctx.resource.contained).forEach((vs, i) => {
    if (vs.resourceType !== 'ValueSet') {
      return;
    }
    const path = `contained[${i}]`;
    const key = str(vs.name) ?? str(vs.id);
    if (key === undefined) {
      ctx.problems.add(path, 'a contained ValueSet needs a name or an id (its %name in rules)');
      return;
    }
    const codes: PackValueSet['codes'] = [];
    expansionCodes(isObject(vs.expansion) ? vs.expansion.contains : undefined, codes);
    const compose = isObject(vs.compose) ? vs.compose : {};
    for (const include of list(compose.include)) {
      const system = str(include.system);
      for (const concept of list(include.concept)) {
        const code = str(concept.code);
        if (system !== undefined && code !== undefined) {
          const display = str(concept.display);
          codes.push(display === undefined ? { system, code } : { system, code, display });
        }
      }
    }
    if (codes.length === 0) {
      ctx.problems.add(
        path,
        `ValueSet '${key}' lists no codes (expansion.contains or compose.include.concept)`,
      );
    }
    if (Object.hasOwn(out, key)) {
      ctx.problems.add(`${path}.name`, `duplicate value set name '${key}'`);
    }
    const entry: PackValueSet = { codes };
    const title = str(vs.title);
    const url = str(vs.url);
    if (title !== undefined) {
      entry.title = title;
    }
    if (url !== undefined) {
      entry.url = url;
    }
    Object.defineProperty(out, key, { value: entry, enumerable: true, writable: true });
  });
  return Object.keys(out).length > 0 ? out : undefined;
}

/**
 * `library` entries must name contained asset-collection Libraries (`#id`) whose depends-on
 * artifacts are contained ValueSets: there is no library or terminology server (and no CQL).
 */
function checkLibraries(ctx: Context): void {
  const containedValueSets = new Set<string>();
  for (const r of ctx.contained.values()) {
    if (r.resourceType === 'ValueSet') {
      containedValueSets.add(`#${String(r.id)}`);
      if (typeof r.url === 'string') {
        containedValueSets.add(r.url);
      }
    }
  }
  const libraries = Array.isArray(ctx.resource.library) ? (ctx.resource.library as unknown[]) : [];
  libraries.forEach((canonical, i) => {
    const path = `library[${i}]`;
    const library = typeof canonical === 'string' ? ctx.contained.get(canonical) : undefined;
    if (library?.resourceType !== 'Library') {
      ctx.problems.add(
        path,
        'only contained Libraries (#id) are supported: no CQL, no library server',
      );
      return;
    }
    list(library.relatedArtifact).forEach((artifact, j) => {
      const target = str(artifact.resource);
      if (
        artifact.type === 'depends-on' &&
        (target === undefined || !containedValueSets.has(target))
      ) {
        ctx.problems.add(
          `${path} (relatedArtifact[${j}])`,
          'depends on a ValueSet that is not contained',
        );
      }
    });
  });
}

function codingOf(value: unknown): CdsCoding | undefined {
  if (!isObject(value)) {
    return undefined;
  }
  const system = str(value.system);
  const code = str(value.code);
  if (system === undefined || code === undefined) {
    return undefined;
  }
  const display = str(value.display);
  return display === undefined ? { system, code } : { system, code, display };
}

/** Sets `{{ expr }}` at a dot path with optional `[n]` indexes, creating what is missing. */
function setAtPath(target: Json, path: string, value: string): boolean {
  const steps: Array<string | number> = [];
  for (const part of path.split('.')) {
    const m = /^([A-Za-z][A-Za-z0-9_]*)((?:\[\d+\])*)$/.exec(part);
    if (!m?.[1] || m[1] === '__proto__') {
      return false;
    }
    steps.push(m[1]);
    for (const index of (m[2] ?? '').matchAll(/\[(\d+)\]/g)) {
      steps.push(Number(index[1]));
    }
  }
  let node: unknown = target;
  for (let i = 0; i < steps.length; i += 1) {
    const step = steps[i];
    const next = steps[i + 1];
    const container = node as Record<string | number, unknown>;
    if (step === undefined) {
      return false;
    }
    if (next === undefined) {
      container[step] = value;
      return true;
    }
    const child = container[step];
    if (typeof child !== 'object' || child === null) {
      container[step] = typeof next === 'number' ? [] : {};
    }
    node = container[step];
  }
  return false;
}

function interpolation(expression: string): string {
  return `{{ ${expression} }}`;
}

/** One suggestion action from a PlanDefinition action node. */
function actionTemplate(ctx: Context, node: Json, path: string): ActionTemplate | undefined {
  const codes = isObject(node.type) ? list(node.type.coding).map((c) => str(c.code)) : [];
  const kind = codes.map((c) => (c === undefined ? undefined : ACTION_TYPE[c])).find((t) => t);
  if (kind === undefined) {
    ctx.problems.add(`${path}.type`, 'must be an action-type of create, update or remove');
    return undefined;
  }
  const description = str(node.description);
  if (description === undefined) {
    ctx.problems.add(`${path}.description`, 'a suggestion action needs a description');
    return undefined;
  }
  const template: ActionTemplate = { type: kind, description };
  const canonical = str(node.definitionCanonical);
  if (canonical !== undefined) {
    const contained = ctx.contained.get(canonical);
    if (contained === undefined) {
      ctx.problems.add(`${path}.definitionCanonical`, `'${canonical}' is not a contained resource`);
    } else {
      const { id: _localId, ...resource } = structuredClone(contained);
      template.resource = resource;
    }
  }
  list(node.dynamicValue).forEach((dv, k) => {
    const dvPath = `${path}.dynamicValue[${k}]`;
    const target = str(dv.path) ?? '';
    const expr = isObject(dv.expression) ? str(dv.expression.expression) : undefined;
    if (expr === undefined) {
      return; // the profile already reported it
    }
    if (expr.includes('}}')) {
      ctx.problems.add(`${dvPath}.expression.expression`, "must not contain '}}'");
      return;
    }
    if (target === 'resourceId') {
      template.resourceId = interpolation(expr);
      return;
    }
    if (template.resource === undefined) {
      ctx.problems.add(
        `${dvPath}.path`,
        'sets a resource field but the action has no definitionCanonical resource',
      );
      return;
    }
    if (!setAtPath(template.resource, target, interpolation(expr))) {
      ctx.problems.add(`${dvPath}.path`, `'${target}' is not a path like a.b[0].c`);
    }
  });
  return template;
}

function suggestion(ctx: Context, node: Json, path: string): SuggestionTemplate {
  const out: SuggestionTemplate = { label: str(node.title) ?? '' };
  if (node.precheckBehavior === 'yes') {
    out.isRecommended = true;
  }
  const children = list(node.action);
  const actions: ActionTemplate[] = [];
  if (children.length > 0) {
    if (node.type !== undefined || node.dynamicValue !== undefined) {
      ctx.problems.add(
        path,
        'a suggestion with nested actions carries no type or dynamicValue itself',
      );
    }
    children.forEach((child, k) => {
      const action = actionTemplate(ctx, child, `${path}.action[${k}]`);
      if (action) {
        actions.push(action);
      }
    });
  } else if (node.type !== undefined) {
    const action = actionTemplate(ctx, node, path);
    if (action) {
      actions.push(action);
    }
  }
  if (actions.length > 0) {
    out.actions = actions;
  }
  return out;
}

function card(ctx: Context, action: Json, path: string): CardTemplate {
  const priority = str(action.priority) ?? '';
  const indicator = INDICATOR[priority];
  if (indicator === undefined) {
    ctx.problems.add(`${path}.priority`, 'must be routine, urgent, asap or stat');
  }
  const docs = list(action.documentation);
  const [first, ...rest] = docs;
  const publisher = str(ctx.resource.publisher) ?? '';
  const source: CardTemplate['source'] = {
    label: str(first?.display) ?? str(first?.label) ?? publisher,
  };
  const sourceUrl =
    str(first?.url) ?? (isObject(first?.document) ? str(first.document.url) : undefined);
  if (sourceUrl !== undefined) {
    source.url = sourceUrl;
  }
  const out: CardTemplate = {
    summary: str(action.title) ?? '',
    indicator: indicator ?? 'info',
    source,
  };
  const detail = str(action.description);
  if (detail !== undefined) {
    out.detail = detail;
  }
  const links: LinkTemplate[] = [];
  rest.forEach((doc, k) => {
    const url = str(doc.url);
    if (url === undefined) {
      ctx.problems.add(
        `${path}.documentation[${k + 1}].url`,
        'documentation after the first (the source) becomes a link and needs a url',
      );
      return;
    }
    links.push({ label: str(doc.display) ?? str(doc.label) ?? url, url, type: 'absolute' });
  });
  if (links.length > 0) {
    out.links = links;
  }
  const reasons: CdsCoding[] = [];
  list(action.extension).forEach((ext, k) => {
    if (ext.url !== OVERRIDE_REASON_EXTENSION) {
      return;
    }
    const coding = codingOf(ext.valueCoding);
    if (coding === undefined) {
      ctx.problems.add(
        `${path}.extension[${k}].valueCoding`,
        'an override reason needs a system and a code',
      );
    } else {
      reasons.push(coding);
    }
  });
  if (reasons.length > 0) {
    out.overrideReasons = reasons;
  }
  const selection = str(action.selectionBehavior);
  if (selection === 'any' || selection === 'at-most-one') {
    out.selectionBehavior = selection;
  } else if (selection !== undefined) {
    ctx.problems.add(
      `${path}.selectionBehavior`,
      'only any and at-most-one map to a CDS Hooks card',
    );
  }
  const suggestions = list(action.action).map((child, j) =>
    suggestion(ctx, child, `${path}.action[${j}]`),
  );
  if (suggestions.length > 0) {
    out.suggestions = suggestions;
    // CDS Hooks: suggestions need a selectionBehavior; PlanDefinition leaves it optional.
    out.selectionBehavior ??= 'at-most-one';
  }
  return out;
}

function conditionExpression(ctx: Context, action: Json, path: string): string {
  const parts: string[] = [];
  list(action.condition).forEach((condition, k) => {
    const expr = isObject(condition.expression) ? condition.expression : {};
    if (expr.language !== FHIRPATH) {
      // The profile reports the language; a reference-only expression is ours to refuse.
      return;
    }
    const text = str(expr.expression);
    if (text === undefined) {
      ctx.problems.add(
        `${path}.condition[${k}].expression.expression`,
        'needs an inline FHIRPath expression',
      );
      return;
    }
    parts.push(text);
  });
  return parts.length === 1 ? (parts[0] ?? 'false') : parts.map((p) => `(${p})`).join(' and ');
}

/** True if `raw` looks like a FHIR PlanDefinition (then convert it with planDefinitionToPack). */
export function isPlanDefinition(raw: unknown): boolean {
  return isObject(raw) && raw.resourceType === 'PlanDefinition';
}

/**
 * Converts a rule pack authored as an `eca-rule` PlanDefinition into the internal form.
 * The PlanDefinition is first validated against the rule-pack profile (base R4 + profile
 * constraints). Mapping: identifier (system http://cellcds.dev/fhir/NamingSystem/rule-pack)
 * or kebab-cased `name` -> pack id; `version`/`title`/`publisher`/`description`/
 * `effectivePeriod` -> pack fields; each top-level action -> one rule whose id is the action
 * id, service is the one of its trigger's hook (cds-service extension, or `<pack-id>-<hook>`),
 * `when` the AND of its text/fhirpath applicability conditions, and card from title,
 * description, priority, documentation, override-reason extensions and selectionBehavior;
 * nested actions -> suggestions (title = label, precheckBehavior yes = isRecommended), whose
 * nested actions (or themselves) -> suggestion actions (type create/update/remove, contained
 * resource via definitionCanonical, dynamicValue path -> `{{ expression }}` in that field, or
 * `resourceId`); contained ValueSets -> valueSets; variable extensions -> `let`.
 * The result is not yet validated as a pack (FHIRPath, card limits): `validatePack` does that.
 * @throws PackValidationError listing every problem, with paths inside the PlanDefinition.
 */
export function planDefinitionToPack(resource: unknown): RulePack {
  const profileProblems = validateRulePackPlanDefinition(resource);
  if (profileProblems.length > 0 || !isObject(resource)) {
    throw new PackValidationError(
      profileProblems.map((p) => ({ path: p.path === '' ? '(root)' : p.path, message: p.message })),
    );
  }
  const contained = new Map<string, Json>();
  for (const r of list(resource.contained)) {
    if (typeof r.id === 'string') {
      contained.set(`#${r.id}`, r);
    }
  }
  const ctx: Context = { resource, contained, problems: new Problems() };
  const id = packId(resource);
  const services = declaredServices(ctx, id);
  const rules: PackRule[] = [];
  list(resource.action).forEach((action, i) => {
    const path = `action[${i}]`;
    const trigger = list(action.trigger)[0];
    const hook = str(trigger?.name) ?? '';
    if (!HOOKS.has(hook)) {
      ctx.problems.add(`${path}.trigger[0].name`, `unsupported hook '${hook}'`);
      return;
    }
    let service = services.get(hook);
    if (service === undefined) {
      service = { id: `${id}-${hook}`, hook, description: str(resource.description) ?? '' };
      services.set(hook, service);
    }
    const rule: PackRule = {
      id: str(action.id) ?? '',
      service: service.id,
      when: conditionExpression(ctx, action, path),
      card: card(ctx, action, path),
    };
    const title = str(action.title);
    if (title !== undefined) {
      rule.title = title;
    }
    const textEquivalent = str(action.textEquivalent);
    if (textEquivalent !== undefined) {
      rule.description = textEquivalent;
    }
    rules.push(rule);
  });
  checkLibraries(ctx);
  const pack: RulePack = {
    id,
    version: str(resource.version) ?? '',
    title: str(resource.title) ?? str(resource.name) ?? id,
    publisher: str(resource.publisher) ?? '',
    description: str(resource.description) ?? '',
    services: [...services.values()],
    rules,
  };
  const period = isObject(resource.effectivePeriod) ? resource.effectivePeriod : undefined;
  if (period && (str(period.start) !== undefined || str(period.end) !== undefined)) {
    pack.effectivePeriod = {};
    const start = str(period.start);
    const end = str(period.end);
    if (start !== undefined) {
      pack.effectivePeriod.start = start;
    }
    if (end !== undefined) {
      pack.effectivePeriod.end = end;
    }
  }
  const sets = valueSets(ctx);
  if (sets) {
    pack.valueSets = sets;
  }
  const lets = letExpressions(ctx);
  if (lets) {
    pack.let = lets;
  }
  if (ctx.problems.items.length > 0) {
    throw new PackValidationError(ctx.problems.items);
  }
  return pack;
}
