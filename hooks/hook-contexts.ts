/**
 * Context schemas of the hooks we serve, per the HL7 CDS Hooks Library STU1 (v1.0.1):
 * patient-view, order-select, order-sign. Unknown context fields are tolerated and kept
 * (hook extensions); FHIR resources inside `draftOrders` are kept as sent.
 */
import { z } from 'zod';
import type { HookName } from './types.ts';
import { parseWithSchema } from './validation.ts';

/** The hooks cellcds serves, in a stable order. */
export const HOOK_NAMES: readonly HookName[] = Object.freeze([
  'patient-view',
  'order-select',
  'order-sign',
]);

/** True if `value` is one of {@link HOOK_NAMES}. */
export function isHookName(value: unknown): value is HookName {
  return typeof value === 'string' && (HOOK_NAMES as readonly string[]).includes(value);
}

/** A FHIR logical id (R4 `id` datatype). */
const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;
/** A relative reference `Type/id` (library invariant ord-1, tightened to the FHIR id syntax). */
const RELATIVE_REFERENCE = /^([A-Z][A-Za-z]{0,63})\/([A-Za-z0-9\-.]{1,64})$/;

const fhirId = z.string().regex(FHIR_ID, { error: 'must be a FHIR id' });

function userIdSchema(types: readonly string[]) {
  return z.string().check((ctx) => {
    const match = RELATIVE_REFERENCE.exec(ctx.value);
    if (match?.[1] === undefined || !types.includes(match[1])) {
      ctx.issues.push({
        code: 'custom',
        input: ctx.value,
        message: `must be a reference ${types.map((t) => `${t}/id`).join(', ')}`,
      });
    }
  });
}

const resourceSchema = z.looseObject({
  resourceType: z
    .string()
    .regex(/^[A-Z][A-Za-z]{0,63}$/, { error: 'must be a FHIR resource type' }),
});

/** A FHIR Bundle with or without `type`; entries may mix resource types and statuses. */
const draftOrdersSchema = z.looseObject({
  resourceType: z.literal('Bundle', { error: 'must be a FHIR Bundle' }),
  type: z.string().min(1).optional(),
  entry: z.array(z.looseObject({ resource: resourceSchema })).optional(),
});

const patientViewContext = z.looseObject({
  userId: userIdSchema(['Practitioner', 'PractitionerRole', 'Patient', 'RelatedPerson']),
  patientId: fhirId,
  encounterId: fhirId.optional(),
});

const orderSignContext = z.looseObject({
  userId: userIdSchema(['Practitioner', 'PractitionerRole']),
  patientId: fhirId,
  encounterId: fhirId.optional(),
  draftOrders: draftOrdersSchema,
});

const orderSelectContext = orderSignContext
  .extend({
    selections: z
      .array(z.string().regex(RELATIVE_REFERENCE, { error: 'must be a reference Type/id' }))
      .min(1, { error: 'must list at least one selected order' }),
  })
  .check((ctx) => {
    const present = new Set(
      (ctx.value.draftOrders.entry ?? []).flatMap((e) => {
        const id = e.resource['id'];
        return typeof id === 'string' ? [`${e.resource.resourceType}/${id}`] : [];
      }),
    );
    ctx.value.selections.forEach((selection, i) => {
      if (!present.has(selection)) {
        ctx.issues.push({
          code: 'custom',
          input: selection,
          path: ['selections', i],
          message: 'does not point to a resource in draftOrders',
        });
      }
    });
  });

/** zod schemas of each hook's `context`, keyed by hook name. */
export const HOOK_CONTEXT_SCHEMAS = {
  'patient-view': patientViewContext,
  'order-select': orderSelectContext,
  'order-sign': orderSignContext,
} as const satisfies Record<HookName, z.ZodType>;

/**
 * Validates a hook's `context` object against its schema.
 * @returns the context (unknown fields kept).
 * @throws HookRequestError naming the field, e.g. `context.userId`, `context.selections[1]`.
 */
export function parseHookContext(hook: HookName, context: unknown): Record<string, unknown> {
  return parseWithSchema(HOOK_CONTEXT_SCHEMAS[hook], context, 'context');
}
