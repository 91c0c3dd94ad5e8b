//! A place in a verified credential for a form a later stage derives from it.
//!
//! The policy stage keeps each certificate's and token's Cedar form here, so that the form
//! lives and dies with the credential's cache entry and a warm request reuses it. Identity
//! does not know what the form is (it must not depend on the stages after it): the slot
//! holds any `Send + Sync` value, and the stage that kept one asks for it back by type.

use arc_swap::ArcSwapOption;
use std::any::Any;
use std::sync::Arc;

/// One replaceable derived form. A copy starts with the same form, and either can be
/// replaced without the other seeing it.
#[derive(Default)]
pub(crate) struct FormSlot(ArcSwapOption<Kept>);

/// What is kept: type-erased, so that identity names no type of a later stage.
struct Kept(Arc<dyn Any + Send + Sync>);

impl FormSlot {
    /// The form kept here, if there is one and it is a `T`.
    pub(crate) fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let kept = self.0.load_full()?;
        kept.0.clone().downcast::<T>().ok()
    }

    /// Keeps `form`, replacing what was kept.
    pub(crate) fn set<T: Any + Send + Sync>(&self, form: Arc<T>) {
        self.0.store(Some(Arc::new(Kept(form))));
    }
}

impl Clone for FormSlot {
    fn clone(&self) -> Self {
        FormSlot(ArcSwapOption::new(self.0.load_full()))
    }
}

impl std::fmt::Debug for FormSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.0.load().is_some() { "kept" } else { "empty" };
        f.debug_tuple("FormSlot").field(&state).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_comes_back_by_its_type_only() {
        let slot = FormSlot::default();
        assert!(slot.get::<String>().is_none());
        slot.set(Arc::new(String::from("form")));
        assert_eq!(slot.get::<String>().as_deref().map(String::as_str), Some("form"));
        assert!(slot.get::<u32>().is_none(), "another type is not handed out");
        let copy = slot.clone();
        copy.set(Arc::new(String::from("other")));
        assert_eq!(slot.get::<String>().as_deref().map(String::as_str), Some("form"));
    }
}
