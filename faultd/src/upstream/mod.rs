//! Everything that talks to pagesrv: opening a session (`connect`), keeping a link and
//! getting it back (`link`), and the bulk threads (`bulk`).

pub mod bulk;
pub mod connect;
pub mod link;
