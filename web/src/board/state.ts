// What the board knows: jobs by id (so a job is never shown twice), the paging state
// of each column, and the items.  Pure data; rendering lives in view.ts.
import { ACTIVE, PRIORITIES, STAGES, type Item, type Job, type JobPage, type Priority, type Stage } from "./api";

export const PAGE_SIZE = 50;
const WEIGHT: Record<Priority, number> = { LOW: 0, NORMAL: 1, HIGH: 2, URGENT: 3 };

export interface Column { endCursor: string | null; hasNextPage: boolean; shown: number; loading: boolean }

export class BoardState {
  readonly jobs = new Map<string, Job>();
  readonly columns = new Map<Stage, Column>();
  readonly items = new Map<string, Item>();
  itemsPage = { endCursor: null as string | null, hasNextPage: false, loaded: false };

  constructor() {
    for (const stage of STAGES) {
      this.columns.set(stage, { endCursor: null, hasNextPage: false, shown: PAGE_SIZE, loading: false });
    }
  }

  /** Add a page of a column's jobs (read from the server). */
  addPage(stage: Stage, page: JobPage): void {
    const column = this.columns.get(stage) as Column;
    column.endCursor = page.pageInfo.endCursor;
    column.hasNextPage = page.pageInfo.hasNextPage;
    for (const job of page.nodes) this.upsertJob(job);
  }

  /** Keep the newer of two views of a job (an event and a mutation's answer may cross). */
  upsertJob(job: Job): void {
    const known = this.jobs.get(job.id);
    if (known && Date.parse(known.updatedAt) > Date.parse(job.updatedAt)) return;
    this.jobs.set(job.id, job);
  }

  upsertItem(item: Item): void {
    const known = this.items.get(item.id);
    if (known && Date.parse(known.updatedAt) > Date.parse(item.updatedAt)) return;
    this.items.set(item.id, item);
    for (const job of this.jobs.values()) {
      if (job.item && job.item.id === item.id) job.item = { ...job.item, status: item.status, title: item.title };
    }
  }

  /** A column's jobs in display order: the queue as the scheduler sees it (priority,
   * then age); every other column most recently changed first. */
  jobsIn(stage: Stage): Job[] {
    const jobs = [...this.jobs.values()].filter((job) => job.stage === stage);
    if (stage === "QUEUED") {
      return jobs.sort((a, b) => WEIGHT[b.priority] - WEIGHT[a.priority]
        || Date.parse(a.createdAt) - Date.parse(b.createdAt) || Number(a.id) - Number(b.id));
    }
    return jobs.sort((a, b) => Date.parse(b.updatedAt) - Date.parse(a.updatedAt) || Number(b.id) - Number(a.id));
  }

  /** Jobs per stage; `complete` is false while a column has pages not read yet. */
  counts(): Map<Stage, { count: number; complete: boolean }> {
    const counts = new Map<Stage, { count: number; complete: boolean }>();
    for (const stage of STAGES) {
      counts.set(stage, { count: 0, complete: !(this.columns.get(stage) as Column).hasNextPage });
    }
    for (const job of this.jobs.values()) (counts.get(job.stage) as { count: number }).count++;
    return counts;
  }

  /** Queued jobs per priority (the queue depth). */
  queueDepth(): Map<Priority, number> {
    const depth = new Map<Priority, number>(PRIORITIES.map((p) => [p, 0]));
    for (const job of this.jobs.values()) {
      if (job.stage === "QUEUED") depth.set(job.priority, (depth.get(job.priority) ?? 0) + 1);
    }
    return depth;
  }

  itemsInOrder(): Item[] {
    return [...this.items.values()].sort((a, b) => Number(b.id) - Number(a.id));
  }
}

export function isActive(job: Job): boolean {
  return ACTIVE.has(job.stage);
}
