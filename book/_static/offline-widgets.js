// The site ships no widget manager (it exists only on npm), so an ipywidgets view saved in a page
// cannot be drawn. Say so where the widget would be, instead of leaving an empty space.
document.addEventListener("DOMContentLoaded", () => {
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]');
  for (const view of views) {
    const note = document.createElement("p");
    note.className = "offline-widget-note admonition note";
    note.textContent = "Interactive widget: it runs when you open this chapter in JupyterLab (make lab); " +
      "the book shows only its static outputs.";
    view.parentNode.insertBefore(note, view);
  }
});
