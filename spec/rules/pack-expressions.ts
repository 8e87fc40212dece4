/**
 * Evaluates a rule pack's `let` and `when` expressions with fhirpath.js directly, in the
 * expression environment of issue 3, built here independently of the rules engine (so that
 * content specs do not depend on it). Used by the shipped-pack and PlanDefinition specs.
 */
import fhirpath from 'fhirpath';
import type { Model, UserInvocationTable } from 'fhirpath';
import r4 from 'fhirpath/fhir-context/r4';
import type { PackTestRequest, RulePack } from '../../rules/index.ts';

export type Json = Record<string, unknown>;
export type Compiled = (root: unknown, vars: Json) => unknown[];

const MODEL: Model = r4;

export function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** `inValueSet('name')`: code strings by code; Coding by system+code; CodeableConcept by any coding. */
function valueSetTable(pack: RulePack): UserInvocationTable {
  const sets = new Map<string, { pairs: Set<string>; codes: Set<string> }>();
  for (const [name, vs] of Object.entries(pack.valueSets ?? {})) {
    sets.set(name, {
      pairs: new Set(vs.codes.map((c) => `${c.system}|${c.code}`)),
      codes: new Set(vs.codes.map((c) => c.code)),
    });
  }
  const codingIn = (c: Json, vs: { pairs: Set<string>; codes: Set<string> }): boolean =>
    typeof c.code === 'string' &&
    (typeof c.system === 'string' ? vs.pairs.has(`${c.system}|${c.code}`) : vs.codes.has(c.code));
  return {
    inValueSet: {
      fn: (items: unknown[], name: unknown): unknown[] => {
        const vs = typeof name === 'string' ? sets.get(name) : undefined;
        if (!vs) {
          throw new Error(`unknown value set ${String(name)}`);
        }
        if (items.length === 0) {
          return [];
        }
        return [
          items.some((item) => {
            if (typeof item === 'string') {
              return vs.codes.has(item);
            }
            if (!isObject(item)) {
              return false;
            }
            return Array.isArray(item.coding)
              ? item.coding.some((c) => isObject(c) && codingIn(c, vs))
              : codingIn(item, vs);
          }),
        ];
      },
      arity: { 1: ['String'] },
    },
  };
}

export class PackExpressions {
  readonly pack: RulePack;
  private readonly table: UserInvocationTable;
  private readonly cache = new Map<string, Compiled>();
  private readonly letOrder: string[];
  private readonly valueSetVars: Json;

  constructor(pack: RulePack) {
    this.pack = pack;
    this.table = valueSetTable(pack);
    this.valueSetVars = Object.fromEntries(
      Object.entries(pack.valueSets ?? {}).map(([k, vs]) => [k, vs.codes.map((c) => c.code)]),
    );
    this.letOrder = this.orderLets();
  }

  /** Lets in dependency order (a let may read earlier lets as %name). */
  private orderLets(): string[] {
    const lets = this.pack.let ?? {};
    const names = Object.keys(lets);
    const order: string[] = [];
    const visit = (name: string, stack: string[]): void => {
      if (order.includes(name)) {
        return;
      }
      if (stack.includes(name)) {
        throw new Error(`let cycle ${[...stack, name].join(' -> ')}`);
      }
      const refs = [...(lets[name] ?? '').matchAll(/%([A-Za-z][A-Za-z0-9_]*)/g)].map((m) => m[1]!);
      for (const ref of refs.filter((r) => names.includes(r))) {
        visit(ref, [...stack, name]);
      }
      order.push(name);
    };
    names.forEach((n) => {
      visit(n, []);
    });
    return order;
  }

  compile(expr: string, raw = false): Compiled {
    const key = `${raw ? 'raw' : 'plain'}:${expr}`;
    let fn = this.cache.get(key);
    if (!fn) {
      const compiled = fhirpath.compile(expr, MODEL, {
        userInvocationTable: this.table,
        resolveInternalTypes: !raw,
      });
      fn = (root, vars) => compiled(root, vars) as unknown[];
      this.cache.set(key, fn);
    }
    return fn;
  }

  /** The expression environment of issue 3, built here independently of the engine. */
  variables(request: PackTestRequest, now: Date): Json {
    const context = request.context;
    const prefetch = request.prefetch ?? {};
    const instant = (literal: string): unknown =>
      (fhirpath.evaluate({}, literal, {}, MODEL, { resolveInternalTypes: false }) as unknown[])[0];
    const iso = now.toISOString();
    const vars: Json = {
      ...this.valueSetVars,
      context,
      prefetch,
      patient: findPatient(prefetch),
      draftOrders: context.draftOrders,
      selections: findSelections(context),
      now: instant(`@${iso}`),
      today: instant(`@${iso.slice(0, 10)}`),
    };
    for (const name of this.letOrder) {
      vars[name] = this.compile(this.pack.let![name]!, true)(context, vars);
    }
    return vars;
  }

  /** The ids of the service's rules whose `when` is `[true]`. */
  fired(serviceId: string, request: PackTestRequest, vars: Json): string[] {
    return this.pack.rules
      .filter((r) => r.service === serviceId)
      .filter((r) => {
        const result = this.compile(r.when)(request.context, vars);
        return result.length === 1 && result[0] === true;
      })
      .map((r) => r.id);
  }

  /** Renders `{{ }}` in a card text the way a card would show it (collections joined). */
  render(text: string, request: PackTestRequest, vars: Json): string {
    return text.replace(/\{\{([\s\S]*?)\}\}/g, (_m, expr: string) =>
      this.compile(expr.trim())(request.context, vars)
        .map((v) => (isObject(v) ? JSON.stringify(v) : String(v)))
        .join(', '),
    );
  }
}

function findPatient(prefetch: Json): unknown {
  for (const value of Object.values(prefetch)) {
    if (isObject(value) && value.resourceType === 'Patient') {
      return value;
    }
    if (isObject(value) && Array.isArray(value.entry)) {
      const hit = value.entry.find(
        (e: unknown) =>
          isObject(e) && isObject(e.resource) && e.resource.resourceType === 'Patient',
      ) as Json | undefined;
      if (hit) {
        return hit.resource;
      }
    }
  }
  return undefined;
}

function findSelections(context: Json): unknown[] {
  const drafts = context.draftOrders;
  const wanted = Array.isArray(context.selections) ? (context.selections as unknown[]) : [];
  if (!isObject(drafts) || !Array.isArray(drafts.entry)) {
    return [];
  }
  return drafts.entry
    .map((e: unknown) => (isObject(e) ? e.resource : undefined))
    .filter(
      (r): r is Json => isObject(r) && wanted.includes(`${String(r.resourceType)}/${String(r.id)}`),
    );
}
