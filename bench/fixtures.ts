/**
 * What every bench section works on, read from the repository only (never /work/shared):
 * the shipped medication-safety pack and the Synthea patients of `spec/fixtures/synthea-r4/`,
 * turned into CDS Hooks calls with `buildRequestFromRecord` (order-sign with an NSAID draft,
 * patient-view).
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  buildRequestFromRecord,
  compilePack,
  parsePackText,
  readPatientBundle,
  resolvePackFiles,
} from '../rules/index.ts';
import type {
  CompiledPack,
  EvaluationInput,
  PackService,
  PackTestRequest,
  PatientRecord,
  RulePack,
} from '../rules/index.ts';
import { ROOT_DIR } from './util.ts';

export const PACK_FILE = path.join(ROOT_DIR, 'rules/packs/medication-safety/pack.yaml');
export const SYNTHEA_DIR = path.join(ROOT_DIR, 'spec/fixtures/synthea-r4');

/** The NSAID every order-sign call drafts (RxNorm 310965, in the pack's `nsaids` value set). */
export const IBUPROFEN_DRAFT: Record<string, unknown> = {
  resourceType: 'MedicationRequest',
  status: 'draft',
  intent: 'order',
  medicationCodeableConcept: {
    coding: [
      {
        system: 'http://www.nlm.nih.gov/research/umls/rxnorm',
        code: '310965',
        display: 'Ibuprofen 200 MG Oral Tablet',
      },
    ],
    text: 'Ibuprofen 200 MG Oral Tablet',
  },
};

/**
 * Patients of the end-to-end section: warfarin + NSAID (the warfarin cards fire), diabetes
 * with metformin and a low eGFR, eGFR below 30, a benzodiazepine, an opioid.
 */
export const E2E_PATIENTS = [
  'Mafalda_Turcotte',
  'Derek_Becker',
  'Kyla_Zulauf',
  'Clarine_OKeefe',
  'Isaiah_Schaden',
  'Ali_Herman',
  'Adalberto_Hartmann',
  'Eliseo_Cummings',
];

export interface ManifestPatient {
  file: string;
  last_encounter: string;
  deceased: boolean;
}

export interface BenchPatient {
  name: string;
  file: string;
  /** The end of the patient's last recorded encounter (the engine section evaluates at it). */
  lastEncounter: Date;
  record: PatientRecord;
}

/** The shipped pack, resolved as `pack push` would upload it, and compiled. */
export function loadShippedPack(): { raw: unknown; compiled: CompiledPack } {
  const raw = resolvePackFiles(
    parsePackText(fs.readFileSync(PACK_FILE, 'utf8'), 'yaml'),
    path.dirname(PACK_FILE),
  );
  return { raw, compiled: compilePack(raw as RulePack) };
}

/** The Synthea patients (all, or the first `limit`, or those named), in manifest order. */
export function loadPatients(
  opts: { limit?: number; names?: readonly string[] } = {},
): BenchPatient[] {
  const manifest = (
    JSON.parse(fs.readFileSync(path.join(SYNTHEA_DIR, 'manifest.json'), 'utf8')) as {
      patients: ManifestPatient[];
    }
  ).patients;
  const nameOf = (file: string) => file.split('_').slice(0, 2).join('_');
  let chosen = manifest;
  if (opts.names) {
    const names = opts.names;
    chosen = names.map((n) => {
      const p = manifest.find((m) => nameOf(m.file) === n);
      if (!p) {
        throw new Error(`bench: no Synthea fixture named ${n}`);
      }
      return p;
    });
  }
  if (opts.limit !== undefined) {
    chosen = chosen.slice(0, opts.limit);
  }
  return chosen.map((p) => ({
    name: nameOf(p.file),
    file: p.file,
    lastEncounter: new Date(`${p.last_encounter}T23:59:59Z`),
    record: readPatientBundle(
      JSON.parse(fs.readFileSync(path.join(SYNTHEA_DIR, p.file), 'utf8')) as unknown,
    ),
  }));
}

/** The pack's service for a hook. */
export function serviceFor(pack: RulePack, hook: string): PackService {
  const service = pack.services.find((s) => s.hook === hook);
  if (!service) {
    throw new Error(`bench: the pack has no ${hook} service`);
  }
  return service;
}

/** A CDS Hooks request for a patient: order-sign with the NSAID draft, or patient-view. */
export function requestFor(
  pack: RulePack,
  patient: BenchPatient,
  hook: 'order-sign' | 'patient-view',
): PackTestRequest {
  const service = serviceFor(pack, hook);
  return hook === 'order-sign'
    ? buildRequestFromRecord({ service, record: patient.record, draftOrders: [IBUPROFEN_DRAFT] })
    : buildRequestFromRecord({ service, record: patient.record });
}

/** One engine call: the service, its rules, and the evaluation input. */
export interface EngineCall {
  patient: string;
  hook: 'order-sign' | 'patient-view';
  serviceId: string;
  ruleIds: string[];
  input: EvaluationInput;
}

/** Every patient × (order-sign with the NSAID draft, patient-view), at the last encounter. */
export function engineCalls(pack: RulePack, patients: readonly BenchPatient[]): EngineCall[] {
  const calls: EngineCall[] = [];
  for (const patient of patients) {
    for (const hook of ['order-sign', 'patient-view'] as const) {
      const service = serviceFor(pack, hook);
      const request = requestFor(pack, patient, hook);
      calls.push({
        patient: patient.name,
        hook,
        serviceId: service.id,
        ruleIds: pack.rules.filter((r) => r.service === service.id).map((r) => r.id),
        input: {
          hook: request.hook,
          hookInstance: `bench-${patient.name}-${hook}`,
          context: request.context,
          prefetch: request.prefetch ?? {},
          now: patient.lastEncounter,
        },
      });
    }
  }
  return calls;
}
