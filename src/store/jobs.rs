//! Long jobs asked for in Discord (`/rescrape`, `/retrain`): created by the bot, run by the
//! worker, cancelled by `/cancel`. At most one queued or running job of a kind exists (a partial
//! unique index), so asking twice reports the job already there instead of starting another.

use anyhow::{bail, Context, Result};
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};

use super::Store;
use crate::util::clock::now_secs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    Rescrape,
    Retrain,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rescrape => "rescrape",
            Self::Retrain => "retrain",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "rescrape" => Self::Rescrape,
            "retrain" => Self::Retrain,
            other => bail!("unknown job kind `{other}`"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// The bot stopped while the job ran; a new request resumes from its checkpoint.
    Interrupted,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "interrupted" => Self::Interrupted,
            other => bail!("unknown job state `{other}`"),
        })
    }

    /// Queued or running.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Queued | Self::Running)
    }
}

/// Who asked for a job and where its progress is shown.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub requested_by: Option<u64>,
    pub guild_id: Option<u64>,
    pub channel_id: Option<u64>,
    pub application_id: Option<u64>,
    pub interaction_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub kind: JobKind,
    pub state: JobState,
    pub stage: Option<String>,
    pub progress_done: Option<u64>,
    pub progress_total: Option<u64>,
    pub progress_note: Option<String>,
    pub requested_by: Option<u64>,
    pub guild_id: Option<u64>,
    pub channel_id: Option<u64>,
    pub status_message_id: Option<u64>,
    pub application_id: Option<u64>,
    pub interaction_token: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
    pub cancel_requested: bool,
}

impl Job {
    /// One line for Discord: `retrain job #3: running (train 120/400, loss 1.83)`.
    pub fn summary(&self) -> String {
        let mut s = format!("{} job #{}: {}", self.kind.as_str(), self.id, self.state.as_str());
        let mut detail = Vec::new();
        if let Some(stage) = &self.stage {
            match (self.progress_done, self.progress_total) {
                (Some(d), Some(t)) => detail.push(format!("{stage} {d}/{t}")),
                (Some(d), None) => detail.push(format!("{stage} {d}")),
                _ => detail.push(stage.clone()),
            }
        }
        if let Some(n) = &self.progress_note {
            detail.push(n.clone());
        }
        if self.cancel_requested && self.state.is_active() {
            detail.push("cancel requested".into());
        }
        if let Some(e) = &self.error {
            detail.push(e.clone());
        }
        if !detail.is_empty() {
            s.push_str(&format!(" ({})", detail.join(", ")));
        }
        s
    }
}

/// Result of asking for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobCreated {
    Created(Job),
    /// One of that kind was already queued or running; nothing new was created.
    AlreadyActive(Job),
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Succeeded,
    Failed(String),
    Cancelled,
    /// The bot is stopping; the job's checkpoint lets a later request resume it.
    Interrupted,
}

const COLUMNS: &str = "id, kind, state, stage, progress_done, progress_total, progress_note, requested_by, guild_id, channel_id, status_message_id, application_id, interaction_token, created_at, started_at, finished_at, error, cancel_requested";

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|v| v as u64)
}

fn opt_i64(v: Option<u64>) -> Result<Option<i64>> {
    v.map(|v| i64::try_from(v).with_context(|| format!("id {v} does not fit the store"))).transpose()
}

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<(Job, String, String)> {
    let kind: String = r.get(1)?;
    let state: String = r.get(2)?;
    let job = Job {
        id: r.get(0)?,
        kind: JobKind::Rescrape,
        state: JobState::Queued,
        stage: r.get(3)?,
        progress_done: opt_u64(r.get(4)?),
        progress_total: opt_u64(r.get(5)?),
        progress_note: r.get(6)?,
        requested_by: opt_u64(r.get(7)?),
        guild_id: opt_u64(r.get(8)?),
        channel_id: opt_u64(r.get(9)?),
        status_message_id: opt_u64(r.get(10)?),
        application_id: opt_u64(r.get(11)?),
        interaction_token: r.get(12)?,
        created_at: r.get(13)?,
        started_at: r.get(14)?,
        finished_at: r.get(15)?,
        error: r.get(16)?,
        cancel_requested: r.get::<_, i64>(17)? != 0,
    };
    Ok((job, kind, state))
}

fn finish_row(raw: (Job, String, String)) -> Result<Job> {
    let (mut job, kind, state) = raw;
    job.kind = JobKind::parse(&kind)?;
    job.state = JobState::parse(&state)?;
    Ok(job)
}

impl Store {
    fn jobs_where(&self, clause: &str, args: impl rusqlite::Params) -> Result<Vec<Job>> {
        let mut st = self.conn().prepare(&format!("SELECT {COLUMNS} FROM jobs {clause}"))?;
        let rows = st.query_map(args, job_from_row)?;
        rows.map(|r| finish_row(r?)).collect()
    }

    /// Queue a job of `kind`, unless one of that kind is queued or running: then that one is
    /// returned and nothing is created (single flight, enforced by the schema as well).
    pub fn create_job(&mut self, kind: JobKind, who: &NewJob) -> Result<JobCreated> {
        let now = now_secs();
        let tx = self.conn_mut().transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing = tx.query_row(&format!("SELECT {COLUMNS} FROM jobs WHERE kind = ?1 AND state IN ('queued', 'running')"), [kind.as_str()], job_from_row).optional()?;
        if let Some(raw) = existing {
            return Ok(JobCreated::AlreadyActive(finish_row(raw)?));
        }
        tx.execute(
            "INSERT INTO jobs(kind, state, requested_by, guild_id, channel_id, application_id, interaction_token, created_at, updated_at)
             VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            params![kind.as_str(), opt_i64(who.requested_by)?, opt_i64(who.guild_id)?, opt_i64(who.channel_id)?, opt_i64(who.application_id)?, who.interaction_token, now],
        )
        .with_context(|| format!("creating a {} job", kind.as_str()))?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        let job = self.job(id)?.context("the job just created is gone")?;
        tracing::info!(job = id, kind = kind.as_str(), "job queued");
        Ok(JobCreated::Created(job))
    }

    pub fn job(&self, id: i64) -> Result<Option<Job>> {
        Ok(self.jobs_where("WHERE id = ?1", [id])?.pop())
    }

    /// Queued and running jobs, oldest first.
    pub fn active_jobs(&self) -> Result<Vec<Job>> {
        self.jobs_where("WHERE state IN ('queued', 'running') ORDER BY id", [])
    }

    /// The newest job of `kind` other than `except`.
    pub fn last_job(&self, kind: JobKind, except: i64) -> Result<Option<Job>> {
        Ok(self.jobs_where("WHERE kind = ?1 AND id != ?2 ORDER BY id DESC LIMIT 1", params![kind.as_str(), except])?.pop())
    }

    /// The newest jobs, newest first.
    pub fn recent_jobs(&self, limit: usize) -> Result<Vec<Job>> {
        self.jobs_where("ORDER BY id DESC LIMIT ?1", [limit as i64])
    }

    /// Where the worker edits progress: the status message in `channel_id`.
    pub fn set_job_status_message(&self, id: i64, channel_id: u64, message_id: u64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE jobs SET channel_id = ?2, status_message_id = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, opt_i64(Some(channel_id))?, opt_i64(Some(message_id))?, now_secs()],
            )
            .with_context(|| format!("job {id}: saving its status message"))?;
        Ok(())
    }

    /// Ask the active jobs (of `kind`, or all) to stop. A queued job is cancelled at once (no
    /// worker holds it); a running one gets `cancel_requested` and stops at its next step
    /// boundary. Returns the jobs affected, as they are now.
    pub fn request_cancel(&mut self, kind: Option<JobKind>) -> Result<Vec<Job>> {
        let now = now_secs();
        let tx = self.conn_mut().transaction_with_behavior(TransactionBehavior::Immediate)?;
        let k = kind.map(|k| k.as_str());
        let ids: Vec<i64> = {
            let mut st = tx.prepare("SELECT id FROM jobs WHERE state IN ('queued', 'running') AND (?1 IS NULL OR kind = ?1) ORDER BY id")?;
            let rows = st.query_map([k], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        tx.execute(
            "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ?2, updated_at = ?2 WHERE state = 'queued' AND (?1 IS NULL OR kind = ?1)",
            params![k, now],
        )?;
        tx.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ?2 WHERE state = 'running' AND (?1 IS NULL OR kind = ?1)", params![k, now])?;
        tx.commit()?;
        ids.into_iter().filter_map(|id| self.job(id).transpose()).collect()
    }

    /// Worker side: a queued job starts. Fails unless it is queued and not cancelled.
    pub fn start_job(&self, id: i64) -> Result<Job> {
        let now = now_secs();
        let n = self
            .conn()
            .execute("UPDATE jobs SET state = 'running', started_at = ?2, updated_at = ?2 WHERE id = ?1 AND state = 'queued' AND cancel_requested = 0", params![id, now])?;
        anyhow::ensure!(n == 1, "job {id} is not queued");
        self.job(id)?.with_context(|| format!("job {id} vanished"))
    }

    /// Worker side: report the current stage and progress.
    pub fn update_job_progress(&self, id: i64, stage: &str, done: Option<u64>, total: Option<u64>, note: Option<&str>) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE jobs SET stage = ?2, progress_done = ?3, progress_total = ?4, progress_note = ?5, updated_at = ?6 WHERE id = ?1",
                params![id, stage, opt_i64(done)?, opt_i64(total)?, note, now_secs()],
            )
            .with_context(|| format!("job {id}: saving progress"))?;
        Ok(())
    }

    /// Worker side: has `/cancel` asked this job to stop?
    pub fn job_cancel_requested(&self, id: i64) -> Result<bool> {
        Ok(self.conn().query_row("SELECT cancel_requested FROM jobs WHERE id = ?1", [id], |r| r.get::<_, i64>(0))? != 0)
    }

    /// Worker side: a running job ends.
    pub fn finish_job(&self, id: i64, outcome: &JobOutcome) -> Result<()> {
        let (state, error) = match outcome {
            JobOutcome::Succeeded => ("succeeded", None),
            JobOutcome::Failed(e) => ("failed", Some(e.as_str())),
            JobOutcome::Cancelled => ("cancelled", None),
            JobOutcome::Interrupted => ("interrupted", None),
        };
        let n = self
            .conn()
            .execute("UPDATE jobs SET state = ?2, error = ?3, finished_at = ?4, updated_at = ?4 WHERE id = ?1 AND state = 'running'", params![id, state, error, now_secs()])?;
        anyhow::ensure!(n == 1, "job {id} is not running");
        Ok(())
    }

    /// At start-up: jobs left running by a previous process become `interrupted`.
    pub fn interrupt_running_jobs(&self) -> Result<usize> {
        let now = now_secs();
        Ok(self.conn().execute("UPDATE jobs SET state = 'interrupted', finished_at = ?1, updated_at = ?1 WHERE state = 'running'", [now])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.db")).unwrap();
        (dir, s)
    }

    #[test]
    fn single_flight_per_kind() {
        let (_d, mut s) = store();
        let who = NewJob { requested_by: Some(7), channel_id: Some(9), ..Default::default() };
        let JobCreated::Created(a) = s.create_job(JobKind::Retrain, &who).unwrap() else { panic!("first retrain must be created") };
        assert_eq!((a.state, a.requested_by, a.channel_id), (JobState::Queued, Some(7), Some(9)));
        assert_eq!(s.create_job(JobKind::Retrain, &who).unwrap(), JobCreated::AlreadyActive(a.clone()));
        // Another kind is independent.
        assert!(matches!(s.create_job(JobKind::Rescrape, &who).unwrap(), JobCreated::Created(_)));
        // The schema refuses a second active job even when the check is bypassed.
        let err = s.conn().execute("INSERT INTO jobs(kind, state, created_at, updated_at) VALUES ('retrain', 'running', 0, 0)", []);
        assert!(err.is_err());
        s.start_job(a.id).unwrap();
        assert!(matches!(s.create_job(JobKind::Retrain, &who).unwrap(), JobCreated::AlreadyActive(j) if j.state == JobState::Running));
        s.finish_job(a.id, &JobOutcome::Succeeded).unwrap();
        assert!(matches!(s.create_job(JobKind::Retrain, &who).unwrap(), JobCreated::Created(j) if j.id != a.id));
        assert_eq!(s.active_jobs().unwrap().len(), 2);
    }

    #[test]
    fn cancel_progress_and_interruption() {
        let (_d, mut s) = store();
        let JobCreated::Created(queued) = s.create_job(JobKind::Rescrape, &NewJob::default()).unwrap() else { panic!() };
        let JobCreated::Created(run) = s.create_job(JobKind::Retrain, &NewJob::default()).unwrap() else { panic!() };
        s.start_job(run.id).unwrap();
        s.update_job_progress(run.id, "train", Some(3), Some(10), Some("loss 1.50")).unwrap();
        assert_eq!(s.job(run.id).unwrap().unwrap().summary(), format!("retrain job #{}: running (train 3/10, loss 1.50)", run.id));
        let hit = s.request_cancel(None).unwrap();
        assert_eq!(hit.len(), 2);
        assert_eq!(hit[0].state, JobState::Cancelled, "a queued job is cancelled at once");
        assert_eq!((hit[1].state, hit[1].cancel_requested), (JobState::Running, true));
        assert!(s.job_cancel_requested(run.id).unwrap());
        assert!(s.start_job(queued.id).is_err(), "a cancelled job never starts");
        assert_eq!(s.interrupt_running_jobs().unwrap(), 1);
        assert_eq!(s.job(run.id).unwrap().unwrap().state, JobState::Interrupted);
        assert!(s.request_cancel(None).unwrap().is_empty());
        s.set_job_status_message(run.id, 5, 6).unwrap();
        assert_eq!(s.recent_jobs(1).unwrap()[0].status_message_id, Some(6));
    }
}
